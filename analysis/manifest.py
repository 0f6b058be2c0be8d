"""The training configuration a run's manifest describes (one function for every reader:
the report, the cross-check, the notebooks)."""
from __future__ import annotations

from typing import Any, Mapping

from microbench.model.config import ModelConfig, ParallelConfig, TrainConfig, preset

from analysis.errors import AnalysisError


def config_from_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> TrainConfig | None:
    """The manifest's full ``config`` (model and parallel); else its ``model`` preset; else
    None. A ``config`` that is there but unusable is an AnalysisError naming ``where`` —
    never silently replaced by the preset."""
    c = manifest.get("config")
    if c is not None:
        try:
            return TrainConfig(model=ModelConfig(**c["model"]), parallel=ParallelConfig(**c["parallel"]))
        except (KeyError, TypeError, ValueError) as e:
            raise AnalysisError(f"{where}: manifest config unusable ({type(e).__name__}: {e})") from None
    model = manifest.get("model")
    if isinstance(model, str) and model:
        try:
            return preset(model)
        except ValueError as e:
            raise AnalysisError(f"{where}: manifest model {model!r}: {e}") from None
    return None
