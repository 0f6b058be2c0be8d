"""The metric definitions, derived once, on one page (nccl-tests' ``PERFORMANCE.md`` for the
bus bandwidth; Megatron-DeepSpeed's "LM" formula for model FLOP/s). Probes, the reference step
and the analysis all read them from here, so a number printed by one is comparable with the
others and with nccl-tests or Megatron's own log on the same machine.
"""
from __future__ import annotations

import math

from microbench.model.config import TrainConfig


def bus_factor(kind: str, n: int) -> float | None:
    """nccl-tests' factor from algbw = S/t to busbw, S the full logical buffer (the input of a
    reduce-scatter, the output of an allgather): allreduce 2(n−1)/n; reduce-scatter,
    allgather and alltoall (n−1)/n; broadcast, reduce, send/recv 1. None for a group of one:
    a collective over one rank moves nothing and has no bus bandwidth."""
    if n <= 1:
        return None
    return {"allreduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "allgather": (n - 1) / n, "alltoall": (n - 1) / n,
            "broadcast": 1.0, "reduce": 1.0, "sendrecv": 1.0}[kind]


def tflops(flop: float, seconds: float) -> float:
    """Rate in TFLOP/s (1e12 FLOP per second); a GEMM's FLOP are 2·m·n·k·batch."""
    return flop / seconds / 1e12


def megatron_lm_flop(cfg: TrainConfig) -> float:
    """Model FLOPs of one step, Megatron-DeepSpeed's "LM" formula (DESIGN.md) — what its
    iteration line divides by step time and world size for "[LM]-TFLOPs":
    F = 12·B·s·L·h²·(1 + (f/h)·(3/2 if SwiGLU else 1) + kv_heads/heads + s/h + V/(2·L·h)),
    no recompute factor (recomputation is not useful model work)."""
    m = cfg.model
    B, s, L, h = cfg.parallel.global_batch, m.seq_len, m.num_layers, m.hidden
    mlp = (m.ffn_hidden / h) * (1.5 if m.gated_mlp else 1.0)
    return 12 * B * s * L * h * h * (1 + mlp + m.num_kv_heads / m.num_heads + s / h
                                     + m.vocab_size / (2 * L * h))


def megatron_tflops(cfg: TrainConfig, step_s: float, world: int | None = None) -> float:
    """Per-device TFLOP/s as Megatron-DeepSpeed prints it: F / step / 1e12 / world."""
    if step_s <= 0:
        raise ValueError(f"step time must be > 0 s, got {step_s!r}")
    return tflops(megatron_lm_flop(cfg), step_s) / (world or cfg.parallel.world_size)


def latency_steps(kind: str, n: int, law: str) -> float:
    """How many latency steps one call of ``kind`` over ``n`` participants takes (NCCL's tuning
    model, ``src/graph/tuning.cc``: latency = base + steps × per-step latency). Ring: an
    allreduce is a reduce-scatter then an allgather, 2(n−1) steps; reduce-scatter, allgather
    and alltoall n−1; broadcast and reduce n; a send/recv one hop. Tree: an allreduce goes up
    and down a tree, 2·log2 n; the others log2 n; a send/recv one hop."""
    if n <= 1:
        return 0.0
    if kind == "sendrecv":
        return 1.0
    if law == "ring":
        return {"allreduce": 2 * (n - 1), "broadcast": n, "reduce": n}.get(kind, n - 1)
    if law == "tree":
        return (2 if kind == "allreduce" else 1) * math.log2(n)
    raise ValueError(f"latency law {law!r}: choose ring or tree")
