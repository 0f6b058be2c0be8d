"""System profiles: how long each workload operation takes on one system, and from where.

The pieces live in one module per idea; this module re-exports their public names so
``from analysis.profile import …`` keeps working:

* :mod:`analysis.system` — :class:`SystemProfile`, what the predictor asks;
* :mod:`analysis.spec` — the system YAML schema and :class:`SpecProfile`;
* :mod:`analysis.measured` — :class:`MeasuredProfile` from probe rows, :func:`load_profile`;
* :mod:`analysis.placement` — :func:`group_placement` (Megatron's rank order);
* :mod:`analysis.provenance` — measured / extrapolated / specified;
* :func:`bus_factor` is microbench's (nccl-tests' factors, one definition).
"""
from microbench.collective import bus_factor

from .errors import AnalysisError
from .measured import MeasuredProfile, load_profile, select_ok_rows
from .placement import Placement, group_placement
from .provenance import WORDS, word_of
from .spec import SYSTEMS_DIR, SpecProfile, SystemSpec, shipped_systems, validate_spec
from .system import COMPONENTS, SystemProfile

__all__ = ["AnalysisError", "COMPONENTS", "MeasuredProfile", "Placement", "SYSTEMS_DIR", "SpecProfile",
           "SystemProfile", "SystemSpec", "WORDS", "bus_factor", "group_placement", "load_profile",
           "select_ok_rows", "shipped_systems", "validate_spec", "word_of"]
