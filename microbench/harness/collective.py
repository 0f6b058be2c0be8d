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

from microbench.model.metrics import bus_factor
from microbench.harness.contract import Case, Context, Probe, Skip
from microbench.harness.options import parse_size, torch_dtype
from microbench.runtime.errors import UsageError
from microbench.model.config import dtype_bytes, with_layout
from microbench.model.workload import workload

# DeepSpeed's reduce bucket as the DP probes default to it: 3e7 elements of gradient.
DS_REDUCE_BUCKET_ELEMENTS = 30_000_000
# Integers up to 2^p are exact in a dtype with p significand bits (value bits for ints).
MANTISSA_BITS = {"bf16": 8, "fp16": 11, "fp32": 24, "fp64": 53, "int32": 31, "int64": 63}
PATTERN_MAX = 11  # pattern values are 1..11


def max_summands(dtype: str) -> int:
    """How many pattern values may be summed with every partial sum exact in ``dtype``:
    positive integers ≤ 11, so any partial sum of j of them is ≤ 11·j ≤ 2^p (bf16: 23)."""
    return 2 ** MANTISSA_BITS[dtype] // PATTERN_MAX


def pattern_stride(summands: int, dtype: str) -> int:
    """1 (every element of every rank non-zero) while ``summands`` ranks' values can be
    summed exactly; above that, each element is non-zero on every stride-th rank only."""
    return -(-summands // max_summands(dtype))


def pattern(count: int, *, rank: int, seed: int, dtype: str, device, offset: int = 0,
            summands: int = 1):
    """This rank's fill: integers 1..11, different per rank, element and seed, so that a
    reduction over ``summands`` ranks is exact in ``dtype`` in any order, for any group size.

    Values are positive, so every partial sum of a reduction (ring, tree, any order) is at
    most the full sum. While 11·summands ≤ 2^p every element is non-zero on every rank
    (bf16: groups up to 23, fp16 186, fp32 1.5 M). Beyond, element i is non-zero only on
    the ranks r with (i − r) mod stride = 0, stride = ⌈summands / max⌉: at most ``max``
    (≥ 1) terms per element, so the sum stays exact and never zero, and each rank still
    sends 1/stride non-zero values spread over the whole buffer (the links of gloo, NCCL
    and oneCCL do not compress: the values do not change the time). Where the exact sum
    cannot be wrong by rounding, the check needs no tolerance: a NaN, a lost rank's
    contribution or an all-zero result is always an error.
    """
    import torch
    i = torch.arange(offset, offset + count, device=device, dtype=torch.int64)
    vals = (i * 7 + rank * 3 + seed) % PATTERN_MAX + 1
    stride = pattern_stride(summands, dtype)
    if stride > 1:
        vals = torch.where((i - rank) % stride == 0, vals, torch.zeros_like(vals))
    return vals.to(torch_dtype(dtype))


def count_wrong(got, expected) -> int:
    """Elements not exactly equal to the expected value (NaN and ±inf are always wrong).

    ``expected`` must be exactly representable in ``got``'s dtype (what :func:`pattern`
    guarantees); an expected value that is not is a bug of the probe, not of the collective.
    """
    import torch
    exp64 = expected.to(torch.float64)
    assert torch.equal(exp64.to(got.dtype).to(torch.float64), exp64), \
        "expected values not exact in the buffer dtype: the pattern is not exact"
    return int((~(got.to(torch.float64) == exp64)).sum().item())


def add_size_args(p: argparse.ArgumentParser) -> None:
    """nccl-tests' sweep flags (used when no --model gives the size)."""
    p.add_argument("-b", "--minbytes", default="1K", help="smallest size (K/M/G suffixes)")
    p.add_argument("-e", "--maxbytes", default="16M", help="largest size")
    p.add_argument("-f", "--stepfactor", type=float, default=2.0, help="size multiplication factor")


def validate_sizes(args: argparse.Namespace) -> None:
    args.minbytes_i = parse_size(args.minbytes)
    args.maxbytes_i = parse_size(args.maxbytes)
    if args.maxbytes_i < args.minbytes_i:
        raise UsageError(f"-e {args.maxbytes} is smaller than -b {args.minbytes}")
    if not args.stepfactor > 1:
        raise UsageError(f"-f {args.stepfactor}: the step factor must be > 1")


def sweep_sizes(args: argparse.Namespace) -> list[int]:
    out, s = [], float(args.minbytes_i)
    while s <= args.maxbytes_i * (1 + 1e-9):
        out.append(int(s))
        s *= args.stepfactor
    return out


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

    def model_elements(self, ctx: Context) -> tuple:
        """(op name, S in elements) of this collective in the model's step, or
        (op name, S, dtype) where the workload fixes the dtype (DP gradients)."""
        raise UsageError(f"{self.name} has no model mode")

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def add_args(self, p: argparse.ArgumentParser) -> None:
        add_size_args(p)
        p.add_argument("--axis", default=None, choices=("tp", "dp", "pp", "world"),
                       help="which groups of the rank grid (default: tp with --model, else world)")
        p.add_argument("--groups", default="all", choices=("all", "one"),
                       help="all groups of the axis at once (as in a step), or one with the rest idle")
        p.add_argument("--place", default="both", choices=("both", "in", "out"),
                       help="in-place, out-of-place or both")

    def validate(self, args: argparse.Namespace) -> None:
        validate_sizes(args)

    def sizes(self, args: argparse.Namespace) -> list[int]:
        return sweep_sizes(args)

    def axis(self, ctx: Context) -> str:
        return ctx.args.axis or ("tp" if ctx.cfg is not None else "world")

    def cases(self, ctx: Context) -> Iterable[Case]:
        args = ctx.args
        axis = self.axis(ctx)
        groups, mine, _ = ctx.world.groups_for(ctx.grid, axis)
        n = len(mine)
        active_groups = groups if args.groups == "all" else groups[:1]
        active = mine in active_groups
        if ctx.world.backend == "mpi4py" and active:
            # Create_group is collective over the group: do it here, on every member, before
            # any case allocates (a member failing an allocation would leave the rest waiting
            # in Create_group, where MPI has no timeout).
            mpi_comm(ctx, mine)
        dtype = args.dtype
        mult = self.elements_multiple(n)
        if ctx.cfg is not None:
            op, elements, *fixed = self.model_elements(ctx)
            dtype = fixed[0] if fixed else dtype
            counts = [(op, max(elements // mult, 1) * mult)]
        else:
            el = dtype_bytes(dtype)
            counts = []
            for size in self.sizes(args):
                c = max(size // el // mult, 1) * mult
                if not counts or counts[-1][1] != c:
                    counts.append((self.name, c))
        places = ("out", "in") if args.place == "both" else (args.place,)
        for op, count in counts:
            for place in places:
                el = dtype_bytes(dtype)
                fields = {"kind": self.kind, "op": op, "count": count, "size_bytes": count * el,
                          "dtype": dtype, "redop": self.redop, "place": place,
                          "in_place": place == "in",
                          **ctx.placement(axis, mine, len(active_groups))}
                if n == 1:
                    fields["note"] = "group of one rank: no bus bandwidth"
                yield Case(f"{op}-{count * el}-{place}", fields, group_ranks=mine, active=active)

    def group(self, ctx: Context, case: Case):
        return ctx.world.group(case.group_ranks)

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        n = case.fields["group_size"]
        algbw = case.fields["size_bytes"] / time_s / 1e9 if time_s > 0 else None
        factor = bus_factor(self.kind, n)
        return {"algbw_gbps": algbw,
                "busbw_gbps": algbw * factor if (algbw is not None and factor is not None) else None,
                "busbw_factor": factor}

    def group_index(self, case: Case, rank: int) -> int:
        return case.group_ranks.index(rank)

    def result(self, ctx: Context, case: Case, state: Any) -> list:
        """The buffer the check reads (MICROBENCH_FAULT=corrupt edits it)."""
        return [state["recv"]]

    # -- the same collective through mpi4py (--backend mpi4py) -----------------------------
    def call(self, ctx: Context, case: Case, state: Any) -> None:
        if ctx.world.backend != "mpi4py":
            return self.run(ctx, case, state)
        from mpi4py import MPI
        comm, send, recv = state["mpi"]
        fn = getattr(comm, MPI_CALLS[self.kind])
        fn(MPI.IN_PLACE if case.fields["in_place"] else send, recv)

    def setup(self, ctx: Context, case: Case, *, seed: int) -> Any:
        state = self.make_buffers(ctx, case, seed=seed, inplace=case.fields["in_place"])
        if ctx.world.backend == "mpi4py":
            if self.kind not in MPI_CALLS or (self.kind == "reduce_scatter" and case.fields["in_place"]):
                raise Skip(f"no mpi4py path for {'in-place ' if case.fields['in_place'] else ''}{self.kind}")
            state["mpi"] = (mpi_comm(ctx, case.group_ranks), mpi_buffer(state["send"]),
                            mpi_buffer(state["recv"]))
        return state


MPI_CALLS = {"allreduce": "Allreduce", "allgather": "Allgather",
             "reduce_scatter": "Reduce_scatter_block", "alltoall": "Alltoall"}


def mpi_comm(ctx: Context, ranks: list[int]):
    """An MPI communicator over ``ranks`` (cached); collective over the members only
    (``Create_group``), so idle ranks of ``--groups one`` need not take part."""
    cache = ctx.extra.setdefault("mpi_comms", {})
    key = tuple(ranks)
    if key not in cache:
        world = ctx.world.mpi_comm
        cache[key] = world.Create_group(world.Get_group().Incl(list(key)))
    return cache[key]


def mpi_buffer(t):
    """A buffer mpi4py can read: a host tensor as numpy (shared memory), a device tensor
    as itself (DLPack) where the MPI library is GPU-aware."""
    import torch
    if t.dtype == torch.bfloat16:
        raise Skip("MPI has no bfloat16 datatype: compare with -d fp32 (or fp16)")
    if t.device.type == "cpu":
        return t.numpy()
    from mpi4py import MPI
    query = getattr(MPI, "Query_cuda_support", None) if t.device.type == "cuda" else None
    if query is None or not query():
        raise Skip(f"the MPI library is not {t.device.type}-aware here: use --device cpu "
                   "for host buffers")
    return t


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


def dp_bucket_elements(ctx: Context, bucket_mb: float | None, dtype: str) -> int:
    """Elements of one DP bucket: ``--bucket-mb`` MiB of ``dtype``, else DeepSpeed's 3e7."""
    if bucket_mb is None:
        return DS_REDUCE_BUCKET_ELEMENTS
    return max(1, int(bucket_mb * (1 << 20)) // dtype_bytes(dtype))


def dp_collectives(ctx: Context, *, zero: int | None = None, grad_sync: str | None = None):
    """The workload's DP sync of one step (allreduce, or ZeRO-1's reduction + allgather;
    ``grad_sync="flat"`` for the reduce-scatter of flat buffers instead of DeepSpeed's).

    ``--grad-tp/--grad-pp`` (where a probe has them) size the gradient as the shard of that
    TP × PP layout — e.g. the target's — while the sync runs on this world's DP groups."""
    cfg = ctx.cfg
    gtp, gpp = getattr(ctx.args, "grad_tp", None), getattr(ctx.args, "grad_pp", None)
    if gtp or gpp:
        try:
            cfg = with_layout(cfg, tp=gtp or cfg.parallel.tp, pp=gpp or cfg.parallel.pp,
                              dp=cfg.parallel.dp, global_batch=cfg.parallel.global_batch)
        except ValueError as e:
            raise UsageError(f"--grad-tp {gtp} --grad-pp {gpp}: {e}") from None
    if zero is not None and zero != min(cfg.parallel.zero_stage, 1):
        cfg = with_layout(cfg, zero_stage=zero)
    if grad_sync is not None:
        cfg = with_layout(cfg, grad_sync=grad_sync)
    w = workload(cfg)
    if not w.dp:
        raise UsageError(f"the layout has dp = {cfg.parallel.dp}: no DP gradient sync to measure "
                         "(give --dp ≥ 2)")
    return w


def sp_elements(ctx: Context, kind: str) -> tuple[str, int]:
    """The sequence-parallel TP collective of ``kind`` (allgather or reduce_scatter) of one
    layer from the workload with sequence parallelism switched on: S = [mbs·s, d]."""
    try:
        w = workload(with_layout(ctx.cfg, sequence_parallel=True))
    except ValueError as e:  # e.g. 1T.sc: seq 2048 is not divisible by tp 12
        raise UsageError(f"this layout cannot use sequence parallelism: {e}") from None
    for c in w.collectives:
        if c.kind == kind:
            return c.name, c.elements
    return f"tp_{kind}", w.activation_elements  # tp == 1: same shape, nobody to talk to


class ShardedCollectiveProbe(CollectiveProbe):
    """Allgather and reduce-scatter: S splits n ways; with a model they are either the
    sequence-parallel pair over TP, or (``--axis dp``) one ZeRO-1 bucket of the DP sync: the
    reduce-scatter of flat buffers (DeepSpeed's ZeRO-1/2 allreduce instead; dp_allreduce
    measures the sync as the workload's ``grad_sync`` says) or the parameters' allgather."""

    def add_args(self, p: argparse.ArgumentParser) -> None:
        super().add_args(p)
        p.add_argument("--bucket-mb", type=float, default=None,
                       help="--axis dp: bucket size in MiB (default: 3e7 elements, DeepSpeed's)")

    def elements_multiple(self, n: int) -> int:
        return n

    def model_elements(self, ctx: Context) -> tuple:
        if self.axis(ctx) == "dp":  # ZeRO-1: this kind's half of the DP sync, one bucket of it
            op = next(c for c in dp_collectives(ctx, zero=1, grad_sync="flat").dp
                      if c.kind == self.kind)
            return op.name, min(op.elements, dp_bucket_elements(ctx, ctx.args.bucket_mb, op.dtype)), op.dtype
        return sp_elements(ctx, self.kind)
