"""The compute scale of the main job on a CPU: chosen from a brief measurement of this CPU's
matmul rate in the model's dtype (bf16 on an AVX2-only core is ~40× slower than fp32), so the
largest GEMM of a case takes about a tenth of a second. On a GPU the scale is 1.
"""
from __future__ import annotations

import argparse
import time

from microbench.harness.options import torch_dtype
from microbench.model.config import preset
from microbench.model.workload import workload


TARGET_GEMM_S = 0.1  # the largest GEMM of a case should take about this long on a CPU (s)
TARGET_GEMM_S_QUICK = 0.0125
TARGET_PEAK_S = 1.0  # the square peak GEMM: longer, it is the ceiling every efficiency is against


def gemm_rate_flops(dtype: str, *, size: int = 256, reps: int = 3) -> float:
    """This CPU's matmul rate in ``dtype`` (FLOP/s): the best of ``reps`` size³ products after
    one warm-up. The dtype matters: bf16 on a CPU without AVX-512 runs ~40× slower than fp32."""
    import torch
    dt = torch_dtype(dtype)
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def auto_scale(cfg, *, device_kind: str, quick: bool, rate_flops: float | None = None) -> tuple[float, str]:
    """(scale, why) of the GEMM and memory-bound probes. 1 on a GPU. On a CPU: the largest
    power of two ≤ 1 that brings the layer's largest GEMM under ~0.1 s (0.0125 s with
    --quick) at ``rate_flops``, this CPU's measured rate in the model's dtype. The attention
    probe takes :func:`attention_scale` (its heads must not vanish)."""
    if device_kind != "cpu":
        return 1.0, f"1 on {device_kind}: the target's shapes as they are"
    if not rate_flops or rate_flops <= 0:
        raise ValueError(f"auto_scale on a CPU needs the measured GEMM rate, got {rate_flops!r}")
    target_s = TARGET_GEMM_S_QUICK if quick else TARGET_GEMM_S
    budget = rate_flops * target_s
    w = workload(cfg)
    biggest = max(g.flop for g in w.gemms + w.head_gemms)
    scale = 1.0
    while scale > 1 / 1024 and biggest * scale ** 3 > budget:
        scale /= 2
    why = (f"{scale:g}: the largest GEMM ({biggest:.3g} FLOP at scale 1) × scale³ within "
           f"{target_s:g} s at this CPU's measured {cfg.model.dtype} matmul rate "
           f"{rate_flops / 1e9:.3g} GFLOP/s")
    att = attention_scale(cfg, scale)
    if att != scale:
        why += (f"; attention at {att:g}, the smallest scale that keeps one head per rank "
                f"({cfg.model.num_heads} heads / tp {cfg.parallel.tp})")
    return scale, why


def attention_scale(cfg, scale: float) -> float:
    """``scale``, or larger where it would leave a rank less than one attention head."""
    return max(scale, 1.0 / (cfg.model.num_heads // cfg.parallel.tp))


def auto_peak_size(*, rate_flops: float, quick: bool) -> int:
    """The square peak GEMM on a CPU: the largest power of two N in [256, 2048] whose 2·N³
    FLOP take at most ~1 s (¼ s with --quick) at the measured rate. A fixed 2048 takes
    ~26 s per iteration in bf16 on an AVX2 core."""
    budget = rate_flops * (TARGET_PEAK_S / 4 if quick else TARGET_PEAK_S)
    n = 256
    while n < 2048 and 2 * (2 * n) ** 3 <= budget:
        n *= 2
    return n


def choose_scale(args: argparse.Namespace, device_kind: str) -> None:
    """Set ``args.scale`` and ``args.peak_size`` (and ``args.scale_why``) once, before any
    step is planned: given, or from this CPU's measured GEMM rate in the model's dtype."""
    if args.scale is not None and (args.peak_size or device_kind != "cpu"):
        args.scale_why = args.scale_why or f"{args.scale:g}: given with --scale"
        return
    cfg = preset(args.model)
    rate = gemm_rate_flops(cfg.model.dtype) if device_kind == "cpu" else None
    if args.scale is None:
        args.scale, args.scale_why = auto_scale(cfg, device_kind=device_kind, quick=args.quick, rate_flops=rate)
    if rate and not args.peak_size:
        args.peak_size = auto_peak_size(rate_flops=rate, quick=args.quick)
        args.scale_why += f"; peak GEMM {args.peak_size}³ (≤ {TARGET_PEAK_S / (4 if args.quick else 1):g} s at that rate)"
