"""Shared declaration for collective probes: sizes, groups, fill/check, bus bandwidth.

Bus bandwidth (nccl-tests' PERFORMANCE.md convention), with S the bytes of the full logical
buffer, n the group size and algbw = S / t in GB/s (1e9 B/s):

    allreduce        busbw = algbw · 2(n−1)/n
    reduce_scatter   busbw = algbw · (n−1)/n      (S = total input)
    allgather        busbw = algbw · (n−1)/n      (S = total output)
    alltoall         busbw = algbw · (n−1)/n
    broadcast, reduce, send/recv   busbw = algbw

A group of one rank moves nothing between ranks: its busbw is None (printed n/a), not 0.
A concrete probe sets ``kind``, ``bus_factor`` and implements ``make_buffers``/``run``/
``expected``; sizes, axes, ``--groups all|one`` and the nccl-tests table come from here.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

from .harness import Case, Context, Probe, Skip, parse_size, torch_dtype
from .runtime import UsageError
from .config import dtype_bytes, with_layout
from .workload import workload

MANTISSA_BITS = {"bf16": 8, "fp16": 11, "fp32": 24, "fp64": 53, "int32": 31, "int64": 63}


def bus_factor(kind: str, n: int) -> float | None:
    """nccl-tests' factor from algbw to busbw; None for a group of one."""
    if n <= 1:
        return None
    return {"allreduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "allgather": (n - 1) / n, "alltoall": (n - 1) / n,
            "broadcast": 1.0, "reduce": 1.0, "sendrecv": 1.0}[kind]


def pattern(count: int, *, rank: int, seed: int, dtype: str, device, offset: int = 0):
    """Small non-zero integers 1..11, different per rank and per seed (never zeros), exact
    in every dtype, so sums of up to ~23 ranks stay exact even in bf16."""
    import torch
    i = torch.arange(offset, offset + count, device=device, dtype=torch.int64)
    vals = (i * 7 + rank * 3 + seed) % 11 + 1
    return vals.to(torch_dtype(dtype))


def count_wrong(got, expected, *, dtype: str, terms: int) -> int:
    """Elements outside the tolerance of a sum of ``terms`` values of at most 11."""
    import torch
    exact_limit = 2 ** MANTISSA_BITS.get(dtype, 24)
    tol = 0.0 if 11 * terms <= exact_limit else 11 * terms * terms / exact_limit
    diff = (got.to(torch.float64) - expected.to(torch.float64)).abs()
    return int((diff > tol).sum().item())


class CollectiveProbe(Probe):
    kind = "allreduce"
    footer_metric = "busbw_gbps"
    default_iters = 20
    default_warmup = 5
    redop = "sum"
    places: tuple[str, ...] = ("out", "in")
    columns = (("size", "size_bytes", ">12d"), ("count", "count", ">11d"), ("type", "dtype", ">5"),
               ("redop", "redop", ">5"), ("place", "place", ">5"), ("axis", "axis", ">5"),
               ("n", "group_size", ">3d"), ("groups", "num_groups", ">6d"),
               ("time(us)", "time_us", ">10.1f"), ("algbw(GB/s)", "algbw_gbps", ">11.3f"),
               ("busbw(GB/s)", "busbw_gbps", ">11.3f"), ("#wrong", "num_wrong", ">6d"))

    # -- what a concrete collective declares ---------------------------------------------
    def elements_multiple(self, n: int) -> int:
        """S must be a multiple of this many elements (n for allgather/reduce-scatter)."""
        return 1

    def model_elements(self, ctx: Context) -> tuple[str, int]:
        """(op name, S in elements) of this collective in the model's step."""
        raise UsageError(f"{self.name} has no model mode")

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("-b", "--minbytes", default="1K", help="smallest size (K/M/G suffixes)")
        p.add_argument("-e", "--maxbytes", default="16M", help="largest size")
        p.add_argument("-f", "--stepfactor", type=float, default=2.0, help="size multiplication factor")
        p.add_argument("--axis", default=None, choices=("tp", "dp", "pp", "world"),
                       help="which groups of the rank grid (default: tp with --model, else world)")
        p.add_argument("--groups", default="all", choices=("all", "one"),
                       help="all groups of the axis at once (as in a step), or one with the rest idle")
        p.add_argument("--place", default="both", choices=("both", "in", "out"),
                       help="in-place, out-of-place or both")

    def validate(self, args: argparse.Namespace) -> None:
        args.minbytes_i = parse_size(args.minbytes)
        args.maxbytes_i = parse_size(args.maxbytes)
        if args.maxbytes_i < args.minbytes_i:
            raise UsageError(f"-e {args.maxbytes} is smaller than -b {args.minbytes}")
        if not args.stepfactor > 1:
            raise UsageError(f"-f {args.stepfactor}: the step factor must be > 1")

    def sizes(self, args: argparse.Namespace) -> list[int]:
        out, s = [], float(args.minbytes_i)
        while s <= args.maxbytes_i * (1 + 1e-9):
            out.append(int(s))
            s *= args.stepfactor
        return out

    def axis(self, ctx: Context) -> str:
        return ctx.args.axis or ("tp" if ctx.cfg is not None else "world")

    def cases(self, ctx: Context) -> Iterable[Case]:
        args = ctx.args
        axis = self.axis(ctx)
        groups, mine, _ = ctx.world.groups_for(ctx.grid, axis)
        n = len(mine)
        active_groups = groups if args.groups == "all" else groups[:1]
        active = mine in active_groups
        el = dtype_bytes(args.dtype)
        mult = self.elements_multiple(n)
        if ctx.cfg is not None:
            op, elements = self.model_elements(ctx)
            counts = [(op, elements)]
        else:
            counts = []
            for size in self.sizes(args):
                c = max(size // el // mult, 1) * mult
                if not counts or counts[-1][1] != c:
                    counts.append((self.name, c))
        places = ("out", "in") if args.place == "both" else (args.place,)
        for op, count in counts:
            for place in places:
                fields = {"kind": self.kind, "op": op, "count": count, "size_bytes": count * el,
                          "dtype": args.dtype, "redop": self.redop, "place": place,
                          "in_place": place == "in",
                          **ctx.placement(axis, mine, len(active_groups))}
                if n == 1:
                    fields["note"] = "group of one rank: no bus bandwidth"
                yield Case(f"{op}-{count * el}-{place}", fields, group_ranks=mine, active=active)

    def group(self, ctx: Context, case: Case):
        return ctx.world.group(case.group_ranks)

    def setup(self, ctx: Context, case: Case, *, seed: int) -> Any:
        return self.make_buffers(ctx, case, seed=seed, inplace=case.fields["in_place"])

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        n = case.fields["group_size"]
        algbw = case.fields["size_bytes"] / time_s / 1e9 if time_s > 0 else None
        factor = bus_factor(self.kind, n)
        return {"algbw_gbps": algbw,
                "busbw_gbps": algbw * factor if (algbw is not None and factor is not None) else None,
                "busbw_factor": factor}

    def group_index(self, case: Case, rank: int) -> int:
        return case.group_ranks.index(rank)


def tp_activation_elements(ctx: Context) -> tuple[str, int]:
    """The TP allreduce of [mbs·s, d] from the workload (sequence parallelism switched off,
    since that is the message an allreduce-based step moves)."""
    cfg = with_layout(ctx.cfg, sequence_parallel=False) if ctx.cfg.parallel.sequence_parallel else ctx.cfg
    w = workload(cfg)
    for c in w.collectives:
        if c.kind == "allreduce":
            return c.name, c.elements
    # tp == 1 in the layout: the message is the same shape, there is just nobody to talk to.
    return "tp_allreduce", w.activation_elements
