"""GEMM probe: the TP-sharded GEMMs of one layer and the LM head, fwd/dgrad/wgrad, every rank busy.

    mpiexec -n 2 python -m microbench.gemm --model alcf-1t --tp 12 --scale 0.25
    python -m microbench.gemm --shape 8192,8192,8192 -d bf16 --concurrent one

Compute-bound at the model's shapes (2·m·n·k FLOP on m·k + k·n + m·n elements), so the
figure is TFLOP/s = 2·m·n·k·batch / t and its % of the measured peak (a square GEMM in the
same dtype, measured first under the same --concurrent) and of the device's spec peak.
Shapes come from the workload only (DESIGN.md, Y = X·Wᵀ, T = mbs·s tokens):
fwd (T, out, in) as X·Wᵀ ("NT"), dgrad (T, in, out) as dY·W ("NN"), wgrad (out, in, T) as
dYᵀ·X ("TN"), so each phase also runs with the operand layout a framework gives it. The
recompute phase of full activation checkpointing repeats the fwd shapes and is not re-measured.
"""
from __future__ import annotations

import argparse
from typing import Any

from microbench.harness.checks import count_gemm_wrong
from microbench.harness.compute import ComputeProbe, Work, randn, scale_dim
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.harness.modelargs import config_from_args
from microbench.runtime.errors import UsageError
from microbench.model.workload import distinct_gemms

LAYOUT = {"fwd": "NT", "dgrad": "NN", "wgrad": "TN"}
MULTIPLE = 8  # scaled GEMM dims stay multiples of 8: what tensor cores / XMX tiles want


def gemm_shapes(cfg, *, scale: float = 1.0) -> list[dict[str, Any]]:
    """The workload's distinct GEMMs (:func:`~microbench.model.workload.distinct_gemms`) as
    cases, every dimension scaled by ``--scale`` to a multiple of 8."""
    out = []
    for g in distinct_gemms(cfg):
        m, n, k = (scale_dim(v, scale, f"{g.name} {g.phase} {d}", multiple=MULTIPLE)
                   for d, v in (("m", g.m), ("n", g.n), ("k", g.k)))
        out.append({"op": g.name, "phase": g.phase, "m": m, "n": n, "k": k, "batch": g.batch,
                    "dtype": g.dtype, "flop": 2 * m * n * k * g.batch, "layout": LAYOUT[g.phase]})
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(f"--shape {text!r}: expected three positive integers m,n,k")
    return dims  # type: ignore[return-value]


def gemm_operands(f: dict[str, Any], *, seed: int, device):
    """A (m×k) and B (k×n) as views with the phase's layout: N = row-major, T = a transpose."""
    m, n, k, dt = f["m"], f["n"], f["k"], f["dtype"]
    ta, tb = f["layout"]
    a = randn((k, m) if ta == "T" else (m, k), seed=seed, dtype=dt, device=device)
    b = randn((n, k) if tb == "T" else (k, n), seed=seed + 1000, dtype=dt, device=device)
    return (a.t() if ta == "T" else a), (b.t() if tb == "T" else b)


def gemm_work(f: dict[str, Any], *, seed: int, device, check_rows: int = 16, check_cols: int = 256) -> Work:
    """C = A·B timed; checked on C's first rows/columns against a float64 reference, with
    the tolerance derived in :mod:`microbench.harness.checks` (output rounding + probabilistic fp32
    accumulation bound; NaN/inf wrong)."""
    import torch
    a, b = gemm_operands(f, seed=seed, device=device)
    c = torch.empty((f["m"], f["n"]), dtype=a.dtype, device=device)

    def check() -> tuple[int, int]:
        r, q = min(f["m"], check_rows), min(f["n"], check_cols)
        return count_gemm_wrong(c[:r, :q], a[:r], b[:, :q], dtype=f["dtype"]), r * q
    return Work(lambda: torch.mm(a, b, out=c), check, output=c)


class Gemm(ComputeProbe):
    name = "gemm"
    module = "microbench.gemm"
    description = __doc__.splitlines()[0]
    columns = (("op", "op", ">9"), ("phase", "phase", ">5"), ("m", "m", ">6d"), ("n", "n", ">6d"),
               ("k", "k", ">6d"), ("type", "dtype", ">4"), ("time(us)", "time_us", ">11.1f"),
               ("TFLOP/s", "tflops", ">8.3f"), ("%peak", "pct_peak", ">6.1f"),
               ("%spec", "pct_spec_peak", ">6.1f"), ("#wrong", "num_wrong", ">6d"))

    def add_args(self, p: argparse.ArgumentParser) -> None:
        super().add_args(p)
        p.add_argument("--shape", action="append", default=[],
                       help="custom GEMM m,n,k (repeatable); measured as well as / instead of --model")

    def standalone(self, args: argparse.Namespace) -> bool:
        return bool(args.shape)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        args.shapes = [parse_shape(s) for s in args.shape]
        cfg = config_from_args(args, layout="world")
        if cfg is not None:
            try:
                gemm_shapes(cfg, scale=args.scale)
            except ValueError as e:
                raise UsageError(str(e)) from None

    def op_cases(self, ctx: Context):
        shapes = gemm_shapes(ctx.cfg, scale=ctx.args.scale) if ctx.cfg is not None else []
        for s in shapes:
            s["dtype"] = ctx.args.dtype  # the model's unless -d overrides it
        for m, n, k in ctx.args.shapes:
            shapes.append({"op": "custom", "phase": "fwd", "m": m, "n": n, "k": k, "batch": 1,
                           "dtype": ctx.args.dtype, "flop": 2 * m * n * k, "layout": "NN"})
        for s in shapes:
            yield self.case(ctx, f"{s['op']}-{s['phase']}-{s['m']}x{s['n']}x{s['k']}", kind="gemm", **s)

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        return gemm_work(case.fields, seed=seed, device=ctx.device)


if __name__ == "__main__":
    main_for(Gemm())
