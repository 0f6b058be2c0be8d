"""The measurement harness: written once, used by every probe (the nccl-tests shape).

A probe declares only what is specific to it (see :class:`Probe`): its cases, how a case
allocates and fills its buffers, the one call to time, how to check the result, and which
rates to derive. Everything else is written once: launching (or starting the embedded
local world), warm-up, the barrier outside the timed region, the cross-rank reduction over
the control group (never the measured one), the correctness count on fresh data, skipped
vs failed cases and output rows flushed per case live here; the seams live beside it —
:mod:`microbench.options` (common flags and their checks), :mod:`microbench.timing` (timer,
statistics, stability warning), :mod:`microbench.lifecycle` (manifest, failure, exit code)
and :mod:`microbench.table` (the human table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pathlib import Path

from . import results
from .config import TrainConfig
from .runtime import (EMBEDDED_ENV, Grid, RendezvousFailure, UsageError, World, detect_launcher, init_world,
                      launched_rank, spawn_local_world)
# The seams (re-exported: probes and tools import these names from the harness).
from .lifecycle import (RUN, abort_rank, build_manifest, device_name,  # noqa: F401
                        fail_fast, failure_exit, finish, install_signal_handlers, outcome,
                        usage_exit)
from .options import (CANONICAL_DTYPE, TORCH_DTYPES, canonical_dtype, check_memory,  # noqa: F401
                      check_out, common_parser, layout_config, make_grid, parse_size,
                      torch_dtype, validate_common, validate_run_flags)
from .table import footer, format_row, header_line  # noqa: F401
from .timing import STABILITY_CV, Timer, stability_warning, summarize  # noqa: F401


class Skip(Exception):
    """Raised by a probe's setup when a case is not supported here (recorded as skipped)."""


@dataclass
class Case:
    """One measured configuration. ``fields`` become row columns as they are."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    group_ranks: list[int] | None = None
    """Ranks of this rank's measured group (None: the probe has no group)."""
    active: bool = True
    """False for a rank that sits idle in this case (``--groups one``): it only barriers."""


class Probe:
    """What a probe declares. Subclass and override; keep it small."""

    name = "probe"
    module = "microbench.probe"
    description = ""
    columns: Sequence[tuple[str, str, str]] = ()
    """Table columns: (header, row key, format spec such as '>12.2f')."""
    default_iters = 20
    default_warmup = 5
    uses_model = True
    layout_matches_world = True
    """False for probes that measure one rank's shard of the layout (compute probes): the
    layout's tp×pp×dp need not equal the world; every rank runs the same shard at once and
    the grid is the world as one DP-like group."""
    footer_metric: str | None = None

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        pass

    def validate(self, args: argparse.Namespace) -> None:
        """Raise UsageError for bad probe-specific values (runs before any rank starts)."""

    def cases(self, ctx: "Context") -> Iterable[Case]:
        raise NotImplementedError

    def setup(self, ctx: "Context", case: Case, *, seed: int) -> Any:
        """Allocate and fill (never zeros) the case's buffers; may raise :class:`Skip`."""
        raise NotImplementedError

    def run(self, ctx: "Context", case: Case, state: Any) -> None:
        """The one call to time."""
        raise NotImplementedError

    def call(self, ctx: "Context", case: Case, state: Any) -> None:
        """What the harness times and checks: :meth:`run`, unless a base class dispatches
        (e.g. to another communication library for ``--backend mpi4py``)."""
        self.run(ctx, case, state)

    def prepare(self, ctx: "Context", case: Case, state: Any) -> None:
        """Called before every iteration, outside the timed region: e.g. evict a cache that
        the operation would not find warm inside a real step."""

    def finish(self, ctx: "Context", rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows derived from the measured ones after the last case (same on every rank):
        an extrapolated total, a ratio of cases. Written and printed like measured rows."""
        return []

    def check(self, ctx: "Context", case: Case, state: Any) -> tuple[int, int]:
        """(wrong, checked) elements after one run on fresh data."""
        return 0, 0

    def result(self, ctx: "Context", case: Case, state: Any) -> list:
        """The tensors :meth:`check` reads; ``MICROBENCH_FAULT=corrupt:…`` perturbs them
        between the checked call and the check, so every check is tested end to end."""
        return []

    def metrics(self, ctx: "Context", case: Case, time_s: float) -> dict[str, Any]:
        """Rates from the statistic's time (s): busbw, TFLOP/s, GB/s..."""
        return {}

    def manifest(self, ctx: "Context") -> dict[str, Any]:
        return {}

    def max_buffer_bytes(self, args: argparse.Namespace) -> int | None:
        """The largest single buffer one rank allocates, when known from the flags alone:
        checked against the rank's share of memory before any rank starts (a lower bound:
        a case may hold several such buffers). Default: the ``-e/--maxbytes`` of a sweep."""
        return getattr(args, "maxbytes_i", None)


@dataclass
class Context:
    args: argparse.Namespace
    world: World
    cfg: TrainConfig | None
    grid: Grid
    writer: results.RunWriter | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def device(self):
        return self.world.device

    def placement(self, axis: str, ranks: Sequence[int], num_groups: int) -> dict[str, Any]:
        return {"axis": axis, "group_size": len(ranks), "num_groups": num_groups,
                "ranks_per_node": self.world.ranks_per_node,
                "crosses_nodes": self.world.crosses_nodes(ranks)}




def _control_barrier(ctx: Context) -> None:
    import torch.distributed as dist
    dist.barrier(group=ctx.world.control)


def _agree(ctx: Context, ok: bool) -> bool:
    """True when every rank says ok (a MIN over the control group)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.world.control)
    return bool(t.item())


def _gather_samples(ctx: Context, samples: list[float]):
    import torch
    import torch.distributed as dist
    mine = torch.tensor(samples, dtype=torch.float64)
    allr = [torch.empty_like(mine) for _ in range(ctx.world.world_size)]
    dist.all_gather(allr, mine, group=ctx.world.control)
    return torch.stack(allr)  # [world, iters]


def _gather_control(ctx: Context, values: Sequence[int]):
    """Every rank's ``values`` over the control group: an int64 tensor [world, len]."""
    import torch
    import torch.distributed as dist
    mine = torch.tensor(list(values), dtype=torch.int64)
    allr = [torch.empty_like(mine) for _ in range(ctx.world.world_size)]
    dist.all_gather(allr, mine, group=ctx.world.control)
    return torch.stack(allr)


def measure_case(probe: Probe, ctx: Context, case: Case, timer: Timer) -> dict[str, Any]:
    """Warm up, time, reduce, check one case on every rank; returns the row (same on all)."""
    args = ctx.args
    row: dict[str, Any] = {"probe": probe.name, "case": case.name, **case.fields,
                           "world_size": ctx.world.world_size, "device": ctx.world.device_kind,
                           "backend": ctx.world.backend, "iters": args.iters,
                           "warmup": args.warmup, "statistic": args.statistic,
                           "timing": timer.method}
    state, reason = None, None
    try:
        state = probe.setup(ctx, case, seed=1) if case.active else None
    except Skip as e:
        reason = f"skipped: {e}"
    except Exception as e:  # e.g. out of memory: every rank learns, nobody hangs
        reason = f"failed: rank {ctx.rank} on {ctx.world.hostname}: {type(e).__name__}: {e}"
    if not _agree(ctx, reason is None):
        # Tell everyone why (the first rank's reason that is not None).
        import torch.distributed as dist
        reasons: list[object] = [None] * ctx.world.world_size
        dist.all_gather_object(reasons, reason, group=ctx.world.control)
        first = next(r for r in reasons if r)
        status, _, why = str(first).partition(": ")
        return {**row, "status": status, "reason": why}

    def once() -> None:
        probe.call(ctx, case, state)

    warm, samples = [], []
    for i in range(args.warmup + args.iters):
        if case.active:
            probe.prepare(ctx, case, state)
        timer.sync()
        _control_barrier(ctx)
        t = timer.time(once) if case.active else 0.0
        (warm if i < args.warmup else samples).append(t * 1e6)
    per_rank = _gather_samples(ctx, samples)  # us, [world, iters]
    active = per_rank.max(dim=1).values > 0
    act = per_rank[active] if bool(active.any()) else per_rank
    per_iter_max = act.max(dim=0).values.tolist()
    stats = summarize(per_iter_max)
    rank_medians = act.median(dim=1).values
    row.update(stats)
    # A case may name its own statistic (a device ceiling is the best iteration, "min").
    row["statistic"] = case.fields.get("statistic", args.statistic)
    row["time_us"] = row[f"time_us_{row['statistic']}"]
    row["time_us_rank_mean"] = float(rank_medians.mean())
    row["time_us_rank_max"] = float(rank_medians.max())
    row["time_us_samples"] = [round(x, 3) for x in per_iter_max]
    row["warmup_us_samples"] = [round(x, 3) for x in warm]
    row.update(probe.metrics(ctx, case, row["time_us"] / 1e6))
    warning = stability_warning(stats, args.iters)
    if warning:
        row["warning"] = warning
    if args.check:
        wrong, checked = 0, 0
        del state  # the check's fresh buffers must fit where the timed ones were
        if case.active:
            fresh = probe.setup(ctx, case, seed=2)
            probe.call(ctx, case, fresh)
            timer.sync()
            corrupt = _corruption(ctx.rank)
            if corrupt is not None:  # fault injection: this rank's result is made wrong
                corrupt(probe.result(ctx, case, fresh))
            wrong, checked = probe.check(ctx, case, fresh)
            del fresh
        per_rank = _gather_control(ctx, [wrong, checked])  # [world, 2]
        wrong, checked = (int(v) for v in per_rank.sum(dim=0).tolist())
        row["num_wrong"], row["num_checked"] = wrong, checked
        if wrong:  # nccl-tests: a wrong result fails the case (and the run)
            by_rank = ", ".join(f"rank {r}: {int(w)}" for r, w in enumerate(per_rank[:, 0].tolist()) if w)
            row["status"] = "failed"
            row["reason"] = f"check: {wrong} of {checked} elements wrong ({by_rank})"
            return row
    row["status"] = "ok"
    return row




def run_probe(probe: Probe, argv: Sequence[str] | None = None) -> int:
    """The whole life of a probe invocation; returns the process exit code (see
    :mod:`microbench.lifecycle`: 0 ok, 1 a case failed, 2 usage error, 128+N a signal).

    Everything that can be checked before a rank starts is checked here, by every process
    alike, and printed once (rank 0, or the embedded world's parent): flags, finite numbers,
    launcher variables, the layout against the world size, sizes against memory, ``--out``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    RUN.module, RUN.rank = probe.module, launched_rank()
    RUN.announce = RUN.rank == 0 and not os.environ.get(EMBEDDED_ENV)
    install_signal_handlers()
    parser = common_parser(probe)
    try:
        args = parser.parse_args(argv)
        validate_common(args)
        probe.validate(args)
        _fault_injection(-1)  # a malformed MICROBENCH_FAULT is a usage error up front
        info = detect_launcher()
        if info is None and args.backend == "mpi4py":
            raise UsageError(f"--backend mpi4py needs an MPI launch (mpiexec -n N python -m "
                             f"{probe.module} ...): the embedded local world has no MPI communicator")
        world_size = args.ranks if info is None else info.world_size
        if world_size is not None and probe.layout_matches_world:
            make_grid(args, world_size)
            layout_config(args, world_size)
        check_memory(args, probe.max_buffer_bytes(args), ranks_per_node=(
            args.ranks if info is None else info.local_size or 1))
        if args.out is not None:
            check_out(args.out)
        elif info is None:  # the parent names the run directory, so it can close it
            args.out = str(results.default_out_dir(probe.name))
            argv = [*argv, "--out", args.out]
    except UsageError as e:
        return usage_exit(str(e))
    if info is None:
        # No launcher: become the parent of an embedded local world of --ranks ranks.
        return spawn_local_world(probe.module, argv, nprocs=args.ranks, timeout_s=args.timeout_s,
                                 run_dir=args.out)
    try:
        return _run_rank(probe, args, argv)
    except UsageError as e:
        return usage_exit(str(e), after_init=True)
    except RendezvousFailure as e:
        return failure_exit(str(e))


def probe_context(probe: Probe, args: argparse.Namespace, world: World) -> Context:
    """The probe's view of the world: its grid, the layout's config and the dtype."""
    if probe.layout_matches_world:
        grid = make_grid(args, world.world_size)
        cfg = layout_config(args, world.world_size)
    else:  # a per-rank shard: --tp/--pp/--dp describe the layout, not this world
        grid = Grid(tp=1, pp=1, dp=world.world_size)
        cfg = layout_config(args, world_size=None)
    if args.dtype is None:
        args.dtype = cfg.model.dtype if cfg is not None else "fp32"
    return Context(args=args, world=world, cfg=cfg, grid=grid)


def run_cases(probe: Probe, ctx: Context, timer: Timer, *, header: bool = True) -> list[dict[str, Any]]:
    """Measure every case of ``probe`` on every rank, writing rows as they end (rank 0).

    A failure inside a case that may have left a collective stuck ends the process (see
    :func:`fail_fast`); rows already written stay on disk.
    """
    args, world, writer = ctx.args, ctx.world, ctx.writer
    show = writer is not None and not args.quiet
    rows: list[dict[str, Any]] = []
    current = "setup"
    try:
        cases = list(probe.cases(ctx))
        if show and header:
            print(f"# {probe.name}: world {world.world_size} ({world.ranks_per_node} ranks/node, "
                  f"{world.num_nodes} node(s)), backend {world.backend}, device {world.device_kind}, "
                  f"launcher {world.launcher}, dtype {args.dtype}, timing {timer.method}")
            if ctx.cfg is not None:
                lay = ctx.cfg.parallel  # the layout (the grid itself for collective probes)
                print(f"# model {ctx.cfg.model.name}: tp {lay.tp} pp {lay.pp} dp {lay.dp} "
                      f"mbs {lay.micro_batch} seq {ctx.cfg.model.seq_len}")
            print(header_line(probe), flush=True)
        fault = _fault_injection(world.rank)
        for i, case in enumerate(cases):
            if fault is not None and i == fault[0]:
                if fault[1] == "hang":  # fault injection for the tests: this rank hangs …
                    while True:
                        time.sleep(60)
                os._exit(17)  # … or dies mid-sweep
            current = case.name
            row = measure_case(probe, ctx, case, timer)
            rows.append(row)
            _emit(probe, ctx, row, show=show)
    except UsageError:
        raise
    except Exception as e:
        fail_fast(probe.module, ctx, current, e)
    for derived in probe.finish(ctx, rows):
        row = {"probe": probe.name, "status": "ok", **derived}
        rows.append(row)
        _emit(probe, ctx, row, show=show, derived=True)
    return rows


def _emit(probe: Probe, ctx: Context, row: dict[str, Any], *, show: bool, derived: bool = False) -> None:
    if ctx.writer is None:
        return
    ctx.writer.write_row(row)
    if show:
        print(format_row(probe, row), flush=True)
        if row.get("warning"):
            print(f"#   unstable: {row['warning'].split(';')[0]}", flush=True)
        if row.get("status") != "ok":
            print(f"#   {row['status']}: {row.get('reason')}", flush=True)
        elif derived and row.get("note"):
            print(f"#   {row['note']}", flush=True)



def _run_rank(probe: Probe, args: argparse.Namespace, argv: Sequence[str]) -> int:
    world = init_world(device=args.device, backend=args.backend, timeout_s=args.timeout_s)
    RUN.rank, RUN.world_size, RUN.store = world.rank, world.world_size, world.store
    ctx = probe_context(probe, args, world)
    if world.rank == 0:
        out = args.out or str(results.default_out_dir(probe.name))
        try:
            ctx.writer = results.RunWriter(out, build_manifest(probe, ctx, argv))
        except (ValueError, OSError) as e:  # --out taken meanwhile, or unwritable
            ctx.writer = None
            fail_fast(probe.module, ctx, "creating the run directory", e)
        RUN.writer = ctx.writer
    RUN.run_dir = Path(share_from_rank0(world, str(ctx.writer.dir) if ctx.writer else None))
    if world.launcher != "embedded" and world.world_size > 1:  # the embedded world's parent witnesses
        from .watchdog import start as start_watchdog
        start_watchdog(RUN.run_dir, rank=world.rank, hostnames=world.hostnames, pids=world.pids)
    rows = run_cases(probe, ctx, Timer(world))
    code = outcome(rows)[1]  # rows are the same on every rank: every rank exits alike
    if ctx.writer is not None:
        footer(probe, rows)
        finish(ctx.writer, rows, host=world.hostname)
        if not args.quiet:
            print(f"# rows: {ctx.writer.dir / results.ROWS}")
    import torch.distributed as dist
    dist.barrier(group=world.control)
    dist.destroy_process_group()
    return code


def share_from_rank0(world: World, value: Any) -> Any:
    """Rank 0's value on every rank (over the control group)."""
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


def _fault_injection(rank: int) -> tuple[int, str] | None:
    """``MICROBENCH_FAULT=R:N[:hang]`` makes rank R die (or hang) before its case N: the tests
    of a dead and of a hung rank. (``corrupt:…`` is :func:`_corruption`'s.)"""
    spec = os.environ.get("MICROBENCH_FAULT")
    if not spec:
        return None
    if spec.startswith("corrupt:"):
        _corruption(rank)  # a malformed spec is a usage error before the first case
        return None
    try:
        who, when, *how = spec.split(":")
        fault = (int(when or 0), how[0] if how else "die")
        if fault[1] not in ("die", "hang") or len(how) > 1:
            raise ValueError
        return fault if int(who) == rank else None
    except ValueError:
        raise UsageError(f"MICROBENCH_FAULT={spec!r}: expected R:N[:hang] or "
                         "corrupt:R:scale=F|nan|zero") from None


def _corruption(rank: int) -> Callable[[list], None] | None:
    """``MICROBENCH_FAULT=corrupt:R:scale=F|nan|zero``: after rank R's checked call (fresh
    data) and before its check, every result tensor the probe names (:meth:`Probe.result`)
    is scaled by F, gets a NaN in its first element, or is zeroed — so each check is shown
    catching a wrong result end to end. None on every other rank or without the variable."""
    spec = os.environ.get("MICROBENCH_FAULT", "")
    if not spec.startswith("corrupt:"):
        return None
    _, who, how = (spec.split(":", 2) + ["", ""])[:3]
    mode, _, value = how.partition("=")
    try:
        target = int(who)
        factor = float(value) if mode == "scale" else None
        if mode not in ("scale", "nan", "zero") or (mode != "scale" and value):
            raise ValueError
    except ValueError:
        raise UsageError(f"MICROBENCH_FAULT={spec!r}: expected corrupt:R:scale=F, corrupt:R:nan "
                         "or corrupt:R:zero") from None
    if target != rank:
        return None

    def corrupt(tensors: list) -> None:
        import torch
        with torch.no_grad():
            for t in tensors:
                if t.numel() == 0:
                    continue
                if mode == "scale":
                    t.mul_(factor)
                elif mode == "zero":
                    t.zero_()
                else:
                    t[(0,) * t.dim()] = float("nan")
    return corrupt



def main_for(probe: Probe) -> None:
    """``if __name__ == '__main__': main_for(MyProbe())``."""
    sys.exit(run_probe(probe))
