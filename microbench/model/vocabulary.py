"""One vocabulary for the whole project, as MLPerf's logger and checker share
``mllog/constants.py``: the provenance words, the components a predicted step is made of, the
phases of the workload's operations, the breakdown timers a measured step is read into, and the
keys of a prediction as written to JSON. The probes, the main job's summary, the predictor, the
report, the plots and the cross-checks all import these names from here; nobody copies them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

# --- provenance ----------------------------------------------------------------------------
PROVENANCE_WORDS = ("measured", "extrapolated", "specified")
"""Every priced figure is one of these, then its detail in parentheses (DESIGN.md, Results):
measured at exactly that shape and group; extrapolated (from what); specified (file: key)."""


def word_of(source: str) -> str:
    """The provenance word a source string starts with; ValueError for anything else (a
    source must never be 'defaulted' or empty)."""
    w = source.split(" ", 1)[0]
    if w not in PROVENANCE_WORDS:
        raise ValueError(f"provenance {source!r} does not start with one of {', '.join(PROVENANCE_WORDS)}")
    return w


def seconds_by_word(per_source: Mapping[str, float]) -> dict[str, float]:
    """{source: seconds} → {word: seconds}, every word present (0 where none)."""
    out = dict.fromkeys(PROVENANCE_WORDS, 0.0)
    for src, t in per_source.items():
        out[word_of(src)] += t
    return out


def word_mix(per_source: Mapping[str, float]) -> str:
    """'measured 62% · extrapolated 38%' from {source: seconds}; '-' when nothing was priced."""
    tot = seconds_by_word(per_source)
    all_t = sum(tot.values())
    if all_t <= 0:
        return "-"
    return " · ".join(f"{w} {tot[w] / all_t:.0%}" for w in PROVENANCE_WORDS if tot[w] > 0)


# --- phases and components of a step ---------------------------------------------------------
PHASES = ("fwd", "recompute", "bwd", "step")
"""When an operation runs, per micro-batch (fwd, the recompute forward inside the backward, bwd)
or once per step (DP sync, optimizer). A GEMM's ``dgrad`` and ``wgrad`` are its ``bwd``."""
PASS_PHASE = {"fwd": "fwd", "dgrad": "bwd", "wgrad": "bwd", "bwd": "bwd", "recompute": "recompute",
              "step": "step"}
"""A workload pass (a GEMM's dgrad/wgrad included) → its phase."""

STEP_COMPONENTS = ("gemm", "attention", "memops", "recompute", "tp_comm", "pp_p2p", "embedding_head",
                   "framework", "bubble", "dp_sync", "optimizer")
"""What a predicted step is made of; the components add up to the step. ``framework`` is the
host's own time that the device does not hide (Python, autograd, launches between kernels)."""

BREAKDOWN_TIMERS = ("compute", "p2p_wait", "dp_sync", "optimizer")
"""What a measured step's timers are read into (the reference step's and Megatron's alike)."""
COMPONENT_TIMER = {"pp_p2p": "p2p_wait", "bubble": "p2p_wait", "dp_sync": "dp_sync", "optimizer": "optimizer"}
"""A predicted component → the measured timer it runs inside (anything else: ``compute``)."""
REFERENCE_TIMERS = {"forward": "compute", "backward": "compute", "p2p_wait": "p2p_wait",
                    "dp_sync": "dp_sync", "optimizer": "optimizer"}
"""``full_model.train``'s timers → breakdown timers."""
MEGATRON_TIMERS = {"forward-compute": "compute", "backward-compute": "compute",
                   "forward-recv": "p2p_wait", "forward-send": "p2p_wait", "backward-recv": "p2p_wait",
                   "backward-send": "p2p_wait", "forward-send-backward-recv": "p2p_wait",
                   "backward-send-forward-recv": "p2p_wait", "all-grads-sync": "dp_sync",
                   "backward-params-all-reduce": "dp_sync", "params-all-gather": "dp_sync",
                   "optimizer": "optimizer"}
"""Megatron-LM's timer names (``--timing-log-level``) → breakdown timers."""


# --- memory-bound ops a measured profile may price from another ------------------------------
FRESH_COPY = "copy_fresh"
"""A copy into a buffer allocated for it: the allocator's first touch of the pages is in it
(``microbench.layer_ops`` measures it at the step's sizes; a device's caching allocator hands
back used blocks, a CPU's returns large ones to the kernel, and every page faults again)."""
STAND_IN = {FRESH_COPY: ("copy", "priced as a copy into a used buffer, without the first touch of a new one")}
"""An op a measured profile has no rows of → the measured op that prices it, and what it leaves out."""


# --- a prediction as JSON ------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionSummary:
    """What a reader of ``analysis.predict --json`` (or ``prediction.json``) may rely on: the
    keys :class:`analysis.predict.Prediction` writes, read by one documented function."""

    step_time_s: float
    breakdown_s: dict[str, float]
    """Step component → seconds (:data:`STEP_COMPONENTS`); they sum to the step."""
    provenance_s: dict[str, dict[str, float]]
    """Step component → {source: seconds}."""
    seconds_by_provenance: dict[str, float]
    """Provenance word → seconds of the step."""
    sources: dict[str, str]
    """Component (and ``peak``, ``memory``, ``overlap.*``) → its sources, worst word first."""
    fom: float
    mfu: float
    model_tflops_per_device: float
    seed_model: dict[str, float]
    notes: list[str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PredictionSummary":
        """From a prediction's JSON object; ValueError naming a missing key."""
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"prediction JSON lacks {', '.join(missing)} (not written by analysis.predict?)")
        return cls(**{f.name: data[f.name] for f in fields(cls)})
