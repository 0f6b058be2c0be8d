"""The measurement harness: written once, used by every probe (the nccl-tests shape).

A probe declares only what is specific to it (see :class:`Probe`): its cases, how a case
allocates and fills its buffers, the one call to time, how to check the result, and which
rates to derive. Everything else is written once: launching (or starting the embedded
local world), warm-up, the barrier outside the timed region, the cross-rank reduction over
the control group (never the measured one), the correctness count on fresh data, skipped
vs failed cases and output rows flushed per case live here; the seams live beside it —
:mod:`microbench.harness.options` (common flags and their checks), :mod:`microbench.harness.timing` (timer,
statistics, stability warning), :mod:`microbench.harness.lifecycle` (manifest, failure, exit code)
and :mod:`microbench.harness.table` (the human table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from microbench.harness.contract import Case, Context, Probe, Skip
from microbench.harness.faults import corruption, fault_plan
from microbench.harness.lifecycle import RUN, build_manifest, fail_fast, failure_exit, finish, install_signal_handlers, outcome, usage_exit
from microbench.harness.modelargs import config_from_args
from microbench.harness.options import check_memory, check_out, common_parser, make_grid, validate_common
from microbench.harness.table import footer, format_row, header_line
from microbench.harness.timing import Timer, stability_warning, summarize
from microbench.model.grid import Grid
from microbench.runtime import results
from microbench.runtime.errors import RendezvousFailure, UsageError
from microbench.runtime.launch import EMBEDDED_ENV, agreed_launch, launched_rank
from microbench.runtime.spawn import spawn_local_world
from microbench.runtime.world import World, init_world


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
    state, reason = _setup(probe, ctx, case)
    if not _agree(ctx, reason is None):
        return {**row, **_first_reason(ctx, reason)}
    warm, samples = _timed(probe, ctx, case, state, timer)
    stats, times = _statistics(ctx, case, warm, samples)
    row.update(stats)
    row.update(times)
    row.update(probe.metrics(ctx, case, row["time_us"] / 1e6))
    warning = stability_warning(stats, args.iters)
    if warning:
        row["warning"] = warning
    if args.check:
        del state  # the check's fresh buffers must fit where the timed ones were
        row.update(_check(probe, ctx, case, timer))
        if row["num_wrong"]:
            return row
    row["status"] = "ok"
    return row


def _setup(probe: Probe, ctx: Context, case: Case) -> tuple[Any, str | None]:
    """The case's buffers on this rank, or why not (``skipped: …`` or ``failed: …``)."""
    try:
        return (probe.setup(ctx, case, seed=1) if case.active else None), None
    except Skip as e:
        return None, f"skipped: {e}"
    except Exception as e:  # e.g. out of memory: every rank learns, nobody hangs
        return None, f"failed: rank {ctx.rank} on {ctx.world.hostname}: {type(e).__name__}: {e}"


def _first_reason(ctx: Context, reason: str | None) -> dict[str, str]:
    """Tell everyone why a rank could not set up: the first rank's reason that is not None."""
    import torch.distributed as dist
    reasons: list[object] = [None] * ctx.world.world_size
    dist.all_gather_object(reasons, reason, group=ctx.world.control)
    first = next(r for r in reasons if r)
    status, _, why = str(first).partition(": ")
    return {"status": status, "reason": why}


def _timed(probe: Probe, ctx: Context, case: Case, state: Any, timer: Timer) -> tuple[list[float], list[float]]:
    """Warm-up and timed iterations (µs), each after a barrier on the control group, outside
    the timed region; an inactive rank takes part in the barriers and times nothing."""
    args = ctx.args

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
    return warm, samples


def _statistics(ctx: Context, case: Case, warm: list[float],
                samples: list[float]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per iteration, the max over the active ranks (what bounds a step): its statistics, then
    the reported one, the mean and max of the ranks' medians, and every sample kept."""
    per_rank = _gather_samples(ctx, samples)  # us, [world, iters]
    active = per_rank.max(dim=1).values > 0
    act = per_rank[active] if bool(active.any()) else per_rank
    per_iter_max = act.max(dim=0).values.tolist()
    stats = summarize(per_iter_max)
    rank_medians = act.median(dim=1).values
    out: dict[str, Any] = {}
    # A case may name its own statistic (a device ceiling is the best iteration, "min").
    out["statistic"] = case.fields.get("statistic", ctx.args.statistic)
    out["time_us"] = stats[f"time_us_{out['statistic']}"]
    out["time_us_rank_mean"] = float(rank_medians.mean())
    out["time_us_rank_max"] = float(rank_medians.max())
    out["time_us_samples"] = [round(x, 3) for x in per_iter_max]
    out["warmup_us_samples"] = [round(x, 3) for x in warm]
    return stats, out


def _check(probe: Probe, ctx: Context, case: Case, timer: Timer) -> dict[str, Any]:
    """The call once more on fresh data, its wrong elements counted on every rank and summed;
    any wrong element fails the case (nccl-tests)."""
    wrong, checked = 0, 0
    if case.active:
        fresh = probe.setup(ctx, case, seed=2)
        probe.call(ctx, case, fresh)
        timer.sync()
        corrupt = corruption(ctx.rank)
        if corrupt is not None:  # fault injection: this rank's result is made wrong
            corrupt(probe.result(ctx, case, fresh))
        wrong, checked = probe.check(ctx, case, fresh)
        del fresh
    per_rank = _gather_control(ctx, [wrong, checked])  # [world, 2]
    wrong, checked = (int(v) for v in per_rank.sum(dim=0).tolist())
    out: dict[str, Any] = {"num_wrong": wrong, "num_checked": checked}
    if wrong:
        by_rank = ", ".join(f"rank {r}: {int(w)}" for r, w in enumerate(per_rank[:, 0].tolist()) if w)
        out["status"] = "failed"
        out["reason"] = f"check: {wrong} of {checked} elements wrong ({by_rank})"
    return out


def run_probe(probe: Probe, argv: Sequence[str] | None = None) -> int:
    """The whole life of a probe invocation; returns the process exit code (see
    :mod:`microbench.harness.lifecycle`: 0 ok, 1 a case failed, 2 usage error, 128+N a signal).

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
        fault_plan(-1)  # a malformed MICROBENCH_FAULT is a usage error up front
        info = agreed_launch(timeout_s=args.timeout_s)
        if info is None and args.backend == "mpi4py":
            raise UsageError(f"--backend mpi4py needs an MPI launch (mpiexec -n N python -m "
                             f"{probe.module} ...): the embedded local world has no MPI communicator")
        world_size = args.ranks if info is None else info.world_size
        if world_size is not None and probe.layout_matches_world:
            make_grid(args, world_size)
            config_from_args(args, layout="world", world_size=world_size)
        check_memory(args, probe.max_buffer_bytes(args), ranks_per_node=(
            args.ranks if info is None else info.local_size or 1))
        if args.out is not None:
            check_out(args.out)
        elif info is None:  # the parent names the run directory, so it can close it
            args.out = str(results.default_out_dir(probe.name))
            argv = [*argv, "--out", args.out]
    except UsageError as e:
        return usage_exit(e)
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
        cfg = config_from_args(args, layout="world", world_size=world.world_size)
    else:  # a per-rank shard: --tp/--pp/--dp describe the layout, not this world
        grid = Grid(tp=1, pp=1, dp=world.world_size)
        cfg = config_from_args(args, layout="world")
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
        fault = fault_plan(world.rank)
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
    RUN.launched = world.launcher != "embedded"
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
        from microbench.runtime.watchdog import START_WAIT_S as WATCHDOG_WAIT_S
        from microbench.runtime.watchdog import start as start_watchdog
        if start_watchdog(RUN.run_dir, rank=world.rank, hostnames=world.hostnames, pids=world.pids) is False:
            late = (f"the watchdog on {world.hostname} was not watching after {WATCHDOG_WAIT_S:g} s: a rank "
                    "that dies before it is may not be named")
            print(f"# warning: {late}", file=sys.stderr, flush=True)
            if ctx.writer is not None:
                ctx.writer.update_manifest(watchdog_warning=late)
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


def main_for(probe: Probe) -> None:
    """``if __name__ == '__main__': main_for(MyProbe())``."""
    sys.exit(run_probe(probe))
