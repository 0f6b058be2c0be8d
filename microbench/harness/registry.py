"""The probes, by name: the one list the main job, the cross-checks and the tests read.

A probe's name is its module under ``microbench`` (``python -m microbench.NAME``) and its row
``probe`` column; the class is what the module's ``main_for`` runs.
"""
from __future__ import annotations

import importlib

from microbench.harness.contract import Probe

PROBES: dict[str, str] = {
    "gemm": "Gemm", "attention": "AttentionCore", "layer_ops": "LayerOps", "peak": "Peak",
    "allreduce": "AllReduce", "allgather": "AllGather", "reduce_scatter": "ReduceScatter",
    "alltoall": "AllToAll", "sendrecv": "SendRecv", "dp_allreduce": "DpAllreduce", "overlap": "Overlap",
    "host": "Host", "tp_sync": "TpSync",
}
"""Probe name → its class in ``microbench.NAME``."""
COMPUTE = ("gemm", "attention", "layer_ops")
"""The compute probes: a rank's shard of the layout, every rank at once."""


def module_of(name: str) -> str:
    return f"microbench.{name}"


def probe(name: str) -> Probe:
    """A fresh instance of the probe ``name`` (KeyError names the known ones)."""
    if name not in PROBES:
        raise KeyError(f"unknown probe {name!r}; known: {', '.join(PROBES)}")
    return getattr(importlib.import_module(module_of(name)), PROBES[name])()
