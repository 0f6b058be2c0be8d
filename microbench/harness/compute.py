"""Shared declaration for compute probes (gemm, attention, layer_ops, peak).

A compute probe measures one rank's shard of the layout (``--model P --tp T``): the layout
need not match the world, every rank runs the same shard at once (``--concurrent all``, as
in a step: a busy node is slower than one busy tile) or rank 0 runs alone (``one``).

``--scale F`` (0 < F ≤ 1) shrinks every dimension for quick runs: ``round(dim·F)``, then up
to a multiple of 8 for GEMM dimensions and sequence lengths that were multiples of 8 (tensor
cores and XMX want them; the preset's dims all are). A dimension whose ``dim·F`` is below 1
is an error, not a silent 1. ``scale`` is recorded in every row.

Efficiency denominators: the measured peak (a large square GEMM in the model dtype, a large
device copy; defined at the end of this module, runnable alone as :mod:`microbench.peak`,
which imports this module and never the other way round) and, where the device is known,
its spec peak. Correctness tolerances: :mod:`microbench.harness.checks`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from microbench.harness.checks import count_gemm_wrong
from microbench.harness.contract import Case, Context, Probe
from microbench.harness.options import parse_size, torch_dtype
from microbench.harness.modelargs import preset_config
from microbench.model.config import dtype_bytes
from microbench.model.devices import spec_peak
from microbench.runtime.errors import UsageError


def scale_dim(value: int, scale: float, name: str, *, multiple: int = 1) -> int:
    """``value`` shrunk by ``scale`` (module docstring); ValueError names a dim that vanishes."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if scale == 1:
        return value
    x = value * scale
    if x < 1:
        raise ValueError(f"--scale {scale:g} makes {name} {value} × {scale:g} = {x:.3g} < 1 "
                         f"(0 after rounding); use a scale ≥ {1 / value:.3g}")
    if multiple > 1 and value % multiple == 0:
        return max(multiple, round(x / multiple) * multiple)
    return max(1, round(x))


def check_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise UsageError(f"--scale {scale:g}: must be in (0, 1]")


def randn(shape, *, seed: int, dtype: str, device, requires_grad: bool = False):
    """Normal data from a fixed seed (never zeros), made on the host so every device agrees."""
    import torch
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float32).to(torch_dtype(dtype)).to(device)
    return t.requires_grad_(requires_grad)


def uniform(shape, *, seed: int, dtype: str, device, low: float = 1.0, high: float = 2.0,
            requires_grad: bool = False):
    """U[low, high) data from a fixed seed: positive check data, for sums that must not cancel."""
    import torch
    g = torch.Generator().manual_seed(seed)
    t = (low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float32)).to(torch_dtype(dtype))
    return t.to(device).requires_grad_(requires_grad)


@dataclass
class Work:
    """What a compute probe's setup returns: the one call to time and its correctness count."""

    run: Callable[[], Any]
    check: Callable[[], tuple[int, int]] = lambda: (0, 0)
    output: Any = None
    """The result buffer where there is a fixed one (for tests)."""
    result: Callable[[], list] | None = None
    """The tensors the check reads (default: [output]); MICROBENCH_FAULT=corrupt edits them."""
    prepare: Callable[[], Any] | None = None
    """Run before every iteration, untimed (a cache flush, for an op that starts cold)."""
    aux: dict[str, Any] = field(default_factory=dict)
    """Measurements made beside the case at set-up (the host probe's operations one by one)."""


class ComputeProbe(Probe):
    layout_matches_world = False
    default_iters = 10
    default_warmup = 2
    footer_metric = "tflops"

    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--scale", type=float, default=1.0,
                       help="shrink every dimension by F (0 < F ≤ 1) for quick runs; recorded in rows")
        p.add_argument("--concurrent", default="all", choices=("all", "one"),
                       help="every rank runs the shard at once (as in a step), or rank 0 alone")
        p.add_argument("--no-peak", action="store_true",
                       help="skip the peak cases (no %% of measured peak)")
        p.add_argument("--peak-tflops", type=float, default=None,
                       help="use this measured peak (TFLOP/s, model dtype) instead of measuring it")
        p.add_argument("--peak-size", type=int, default=None,
                       help="square peak GEMM size (default 8192 on a GPU, 2048 on a CPU)")
        p.add_argument("--copy-bytes", default=None,
                       help="peak copy buffer size (default 1G on a GPU, 128M on a CPU)")

    def validate(self, args: argparse.Namespace) -> None:
        check_scale(args.scale)
        if preset_config(args) is None and not self.standalone(args):
            raise UsageError(f"{self.name} needs --model PRESET (with --tp/--mbs for the layout)")

    def standalone(self, args: argparse.Namespace) -> bool:
        """True when the probe has something to measure without a model (e.g. --shape)."""
        return False

    def case(self, ctx: Context, name: str, **fields: Any) -> Case:
        fields = {"scale": ctx.args.scale, "concurrent": ctx.args.concurrent, **fields}
        active = ctx.args.concurrent == "all" or ctx.rank == 0
        return Case(name, fields, active=active)

    def scaled(self, ctx: Context, value: int, name: str, *, multiple: int = 1) -> int:
        try:
            return scale_dim(value, ctx.args.scale, name, multiple=multiple)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def pct(self, ctx: Context, value: float | None, kind: str, dtype_or_gbps: str) -> dict[str, Any]:
        """% of the measured peak (ctx.extra from the peak cases) and of the spec peak."""
        out: dict[str, Any] = {}
        measured = ctx.extra.get(kind, {}).get(dtype_or_gbps)
        if value is not None and measured:
            out["pct_peak"] = 100 * value / measured
        spec = spec_peak(ctx.extra.get("device_name"), dtype_or_gbps)
        if value is not None and spec:
            out["pct_spec_peak"] = 100 * value / spec
        return out

    # -- generic run/check/metrics: a case's setup returns Work; rates come from its fields
    def setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        if case.fields.get("op") in ("peak", "copy"):
            return setup_peak(ctx, case, seed=seed)
        return self.op_setup(ctx, case, seed=seed)

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        raise NotImplementedError

    def run(self, ctx: Context, case: Case, state: Work) -> None:
        state.run()

    def check(self, ctx: Context, case: Case, state: Work) -> tuple[int, int]:
        return state.check()

    def result(self, ctx: Context, case: Case, state: Work) -> list:
        if state.result is not None:
            return list(state.result())
        return [] if state.output is None else [state.output]

    def prepare(self, ctx: Context, case: Case, state: Work) -> None:
        if state.prepare is not None:
            state.prepare()

    def cases(self, ctx: Context):
        ctx.extra.setdefault("device_name", _device_name(ctx))
        if not ctx.args.no_peak and ctx.args.peak_tflops is None:
            yield from self.peak_cases(ctx)
        if ctx.args.peak_tflops is not None:
            ctx.extra.setdefault("peak_tflops", {})[ctx.args.dtype] = ctx.args.peak_tflops
        yield from self.op_cases(ctx)

    def peak_cases(self, ctx: Context):
        """The denominators this probe's rates need (a GEMM peak by default)."""
        yield gemm_peak_case(self, ctx)

    def op_cases(self, ctx: Context):
        raise NotImplementedError

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        f, out = case.fields, {}
        if time_s <= 0:
            return out
        if "flop" in f:
            out["tflops"] = f["flop"] / time_s / 1e12
            if "flop_causal" in f:
                out["tflops_causal"] = f["flop_causal"] / time_s / 1e12
            if f.get("op") == "peak":
                ctx.extra.setdefault("peak_tflops", {})[f["dtype"]] = out["tflops"]
                if ctx.writer is not None:
                    ctx.writer.update_manifest(peak_tflops=dict(ctx.extra["peak_tflops"]))
            out.update(self.pct(ctx, out["tflops"], "peak_tflops", f["dtype"]))
        elif "bytes_moved" in f:
            out["gbps"] = f["bytes_moved"] / time_s / 1e9
            if f.get("op") == "copy":
                ctx.extra.setdefault("peak_gbps", {})["gbps"] = out["gbps"]
                if ctx.writer is not None:
                    ctx.writer.update_manifest(peak_gbps=out["gbps"])
            out.update(self.pct(ctx, out["gbps"], "peak_gbps", "gbps"))
        if "extrapolation" in f:  # measured a chunk of a memory-bound op: time scales linearly
            out["time_us_step"] = time_s * 1e6 * f["extrapolation"]
        return out

    def manifest(self, ctx: Context) -> dict[str, Any]:
        return {"scale": ctx.args.scale, "concurrent": ctx.args.concurrent}


def _device_name(ctx: Context) -> str:
    from microbench.harness.lifecycle import device_name
    return device_name(ctx.world)


# -- the peak cases (the denominators of every efficiency figure; see microbench.peak) -------

def _on_cpu(ctx: Context) -> bool:
    return ctx.world.device_kind == "cpu"


def gemm_peak_case(probe: ComputeProbe, ctx: Context) -> Case:
    n = ctx.args.peak_size or (2048 if _on_cpu(ctx) else 8192)
    case = probe.case(ctx, f"peak-gemm-{n}", kind="gemm", op="peak", phase="fwd", m=n, n=n, k=n,
                      batch=1, dtype=ctx.args.dtype, flop=2 * n ** 3)
    case.fields["scale"] = 1.0  # a device ceiling: never scaled
    case.fields["statistic"] = "min"  # a ceiling is the best the device did, not the typical
    return case


def copy_peak_case(probe: ComputeProbe, ctx: Context) -> Case:
    size = parse_size(ctx.args.copy_bytes) if ctx.args.copy_bytes else \
        (128 << 20 if _on_cpu(ctx) else 1 << 30)
    count = size // dtype_bytes(ctx.args.dtype)
    case = probe.case(ctx, f"peak-copy-{size}", kind="memop", op="copy", phase="fwd",
                      count=count, size_bytes=count * dtype_bytes(ctx.args.dtype),
                      dtype=ctx.args.dtype, bytes_moved=2 * count * dtype_bytes(ctx.args.dtype))
    case.fields["scale"] = 1.0
    case.fields["statistic"] = "min"  # a ceiling is the best the device did, not the typical
    return case


def setup_peak(ctx: Context, case: Case, *, seed: int) -> Work:
    """The square GEMM (checked on its first 16 rows, :func:`count_gemm_wrong`) or the copy
    (checked exactly)."""
    import torch
    f, dev = case.fields, ctx.device
    if f["op"] == "copy":
        src = randn((f["count"],), seed=seed, dtype=f["dtype"], device=dev)
        dst = torch.empty_like(src)

        def check() -> tuple[int, int]:
            return int((~(dst == src)).sum().item()), f["count"]  # NaN ≠ NaN: wrong
        return Work(lambda: dst.copy_(src), check, output=dst)
    n = f["m"]
    a = randn((n, n), seed=seed, dtype=f["dtype"], device=dev)
    b = randn((n, n), seed=seed + 1000, dtype=f["dtype"], device=dev)
    c = torch.empty((n, n), dtype=a.dtype, device=dev)

    def check() -> tuple[int, int]:
        rows = min(n, 16)
        return count_gemm_wrong(c[:rows], a[:rows], b, dtype=f["dtype"]), rows * n
    return Work(lambda: torch.mm(a, b, out=c), check, output=c)
