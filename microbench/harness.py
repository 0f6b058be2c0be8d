"""The measurement harness: written once, used by every probe (the nccl-tests shape).

A probe declares only what is specific to it (see :class:`Probe`): its cases, how a case
allocates and fills its buffers, the one call to time, how to check the result, and which
rates to derive. Everything else lives here: the common flags, launching (or starting the
embedded local world), warm-up, per-iteration device-correct timing with the barrier
outside the timed region, the cross-rank reduction over the control group (never the
measured one), statistics and stability warnings, the correctness count on fresh data,
skipped vs failed cases, output rows flushed per case, and the human table.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .cli import ArgumentParser
from . import results
from .config import PRESETS, TrainConfig, preset, with_layout
from .runtime import (BACKENDS, DEVICES, Grid, UsageError, World, detect_launcher,
                      init_world, spawn_local_world)

TORCH_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "half": "float16",
                "float16": "float16", "fp32": "float32", "float": "float32", "float32": "float32",
                "fp64": "float64", "double": "float64", "float64": "float64",
                "int32": "int32", "int": "int32", "int64": "int64"}
CANONICAL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                   "int32": "int32", "int64": "int64"}
STABILITY_CV = 0.10  # warn when stdev > 10% of the mean


class Skip(Exception):
    """Raised by a probe's setup when a case is not supported here (recorded as skipped)."""


def parse_size(text: str) -> int:
    """'1K' → 1024, '16M', '2G', '100' bytes (binary suffixes, as nccl-tests)."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMGT" and t else t
    try:
        value = float(digits) * mult
    except ValueError:
        raise UsageError(f"size {text!r} is not a number with an optional K/M/G suffix") from None
    if value <= 0 or value != int(value):
        raise UsageError(f"size {text!r} must be a positive whole number of bytes")
    return int(value)


def canonical_dtype(name: str) -> str:
    try:
        return CANONICAL_DTYPE[TORCH_DTYPES[name.lower()]]
    except KeyError:
        raise UsageError(f"-d/--dtype {name!r}: choose one of bf16, fp16, fp32, fp64, int32") from None


def torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name.lower()])


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

    def metrics(self, ctx: "Context", case: Case, time_s: float) -> dict[str, Any]:
        """Rates from the statistic's time (s): busbw, TFLOP/s, GB/s..."""
        return {}

    def manifest(self, ctx: "Context") -> dict[str, Any]:
        return {}


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


# ---------------------------------------------------------------------------------------------
# Command line

def common_parser(probe: Probe) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"python -m {probe.module}", description=probe.description)
    p.add_argument("-n", "--iters", type=int, default=probe.default_iters, help="timed iterations per case")
    p.add_argument("-w", "--warmup", type=int, default=probe.default_warmup, help="warm-up iterations per case")
    p.add_argument("-d", "--dtype", default=None, help="bf16|fp16|fp32|fp64 (default: the model's, else fp32)")
    p.add_argument("-c", "--check", type=int, default=1, choices=(0, 1), help="check results after timing (1/0)")
    p.add_argument("--out", default=None, help="run directory (default results/<probe>-<time>)")
    p.add_argument("--backend", default="auto", help="|".join(BACKENDS))
    p.add_argument("--device", default="auto", help="|".join(DEVICES))
    p.add_argument("--timeout-s", type=float, default=300.0, help="timeout of every process group (s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the embedded world when no launcher is found")
    p.add_argument("--statistic", default="median", choices=("median", "mean", "min"), help="reported statistic")
    p.add_argument("--model", default=None, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: world / (tp·pp))")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch size")
    p.add_argument("--quiet", action="store_true", help="no table on standard output")
    probe.add_args(p)
    return p


def validate_run_flags(args: argparse.Namespace, *, backends: Sequence[str] = BACKENDS) -> None:
    """The flags every entry point shares: iterations, ranks, timeout, device, backend."""
    for flag, value, low in (("-n/--iters", args.iters, 1), ("-w/--warmup", args.warmup, 0),
                             ("--ranks", args.ranks, 1)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be ≥ {low}")
    if not args.timeout_s > 0:
        raise UsageError(f"--timeout-s {args.timeout_s}: must be > 0")
    if args.backend not in backends:
        raise UsageError(f"--backend {args.backend!r}: choose one of {', '.join(backends)}")
    if args.device not in DEVICES:
        raise UsageError(f"--device {args.device!r}: choose one of {', '.join(DEVICES)}")


def validate_common(args: argparse.Namespace) -> None:
    validate_run_flags(args)
    if args.dtype is not None:
        args.dtype = canonical_dtype(args.dtype)
    for flag in ("tp", "pp", "dp", "mbs"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag} {v}: must be a positive integer")
    if args.model is not None and args.model not in PRESETS:
        raise UsageError(f"--model {args.model!r}: unknown preset; known: {', '.join(PRESETS)}")
    if args.model is not None:
        layout_config(args, world_size=None)  # shape errors before anything starts


def layout_config(args: argparse.Namespace, world_size: int | None) -> TrainConfig | None:
    """The preset with the command line's layout (--tp/--pp/--dp/--mbs) applied."""
    if args.model is None:
        return None
    base = preset(args.model)
    tp = args.tp or 1
    pp = args.pp or 1
    dp = args.dp
    if dp is None:
        dp = max(1, (world_size or tp * pp) // (tp * pp))
    try:
        return with_layout(base, tp=tp, pp=pp, dp=dp, micro_batch=args.mbs, interleave=1)
    except ValueError as e:
        raise UsageError(f"--model {args.model} --tp {tp} --pp {pp} --dp {dp}: {e}") from None


def make_grid(args: argparse.Namespace, world_size: int) -> Grid:
    tp, pp = args.tp or 1, args.pp or 1
    dp = args.dp if args.dp is not None else world_size // (tp * pp)
    grid = Grid(tp=tp, pp=pp, dp=max(dp, 1))
    if grid.size != world_size:
        raise UsageError(f"tp({tp}) × pp({pp}) × dp({dp}) = {grid.size} ≠ world {world_size}")
    return grid


# ---------------------------------------------------------------------------------------------
# Timing

class Timer:
    """Per-iteration device-correct timer: device events where the torch version has them,
    else synchronize and read the host clock (never a bare host clock on async work)."""

    def __init__(self, world: World):
        import torch
        self.kind = world.device_kind
        self.torch = torch
        self.module = getattr(torch, self.kind, None) if self.kind != "cpu" else None
        event_cls = getattr(torch, "Event", None)
        if self.module is not None and event_cls is None:
            event_cls = getattr(self.module, "Event", None)
        self.event_cls = event_cls if self.module is not None else None
        self.method = "device_events" if self.event_cls is not None else \
            ("synchronize+perf_counter" if self.module is not None else "perf_counter")

    def sync(self) -> None:
        if self.module is not None:
            self.module.synchronize()

    def time(self, fn: Callable[[], None]) -> float:
        """Seconds of one call of ``fn``."""
        if self.event_cls is not None:
            start, end = self.event_cls(enable_timing=True), self.event_cls(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def summarize(samples_us: Sequence[float]) -> dict[str, float]:
    xs = sorted(samples_us)
    n = len(xs)
    p95 = xs[min(n - 1, max(0, math.ceil(0.95 * n) - 1))]
    return {"time_us_median": statistics.median(xs), "time_us_mean": statistics.fmean(xs),
            "time_us_min": xs[0], "time_us_max": xs[-1], "time_us_p95": p95,
            "time_us_stdev": statistics.stdev(xs) if n > 1 else 0.0}


def stability_warning(stats: dict[str, float], n: int) -> str | None:
    mean = stats["time_us_mean"]
    if n > 1 and mean > 0 and stats["time_us_stdev"] > STABILITY_CV * mean:
        cv = 100 * stats["time_us_stdev"] / mean
        return (f"stdev is {cv:.0f}% of the mean over {n} iterations; use more iterations "
                "(-n), pin the CPU, or keep other work off the machine")
    return None


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


def _sum_control(ctx: Context, values: Sequence[int]) -> list[int]:
    import torch
    import torch.distributed as dist
    t = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(t, group=ctx.world.control)
    return [int(v) for v in t.tolist()]


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
            wrong, checked = probe.check(ctx, case, fresh)
            del fresh
        wrong, checked = _sum_control(ctx, [wrong, checked])
        row["num_wrong"], row["num_checked"] = wrong, checked
    row["status"] = "ok"
    return row


# ---------------------------------------------------------------------------------------------
# Output

def format_row(probe: Probe, row: dict[str, Any]) -> str:
    cells = []
    for header, key, spec in probe.columns:
        width = max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
        value = row.get(key)
        if row.get("status") != "ok" and key.startswith(("time", "algbw", "busbw", "tflops", "gbps", "num_wrong", "pct")):
            cells.append(f"{row.get('status', '?'):>{width}}")
        elif value is None:
            cells.append(f"{'n/a':>{width}}")
        else:
            try:
                cells.append(format(value, spec))
            except (TypeError, ValueError):
                cells.append(f"{str(value):>{width}}")
    return " ".join(cells)


def header_line(probe: Probe) -> str:
    cells = []
    for header, _key, spec in probe.columns:
        width = max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
        cells.append(f"{header:>{width}}")
    return "#" + " ".join(cells)[1:]


def build_manifest(probe: Probe, ctx: Context, argv: Sequence[str]) -> dict[str, Any]:
    w = ctx.world
    man = {"probe": probe.name, "command": [sys.executable, "-m", probe.module, *argv],
           "world_size": w.world_size, "hostnames": w.hostnames, "num_nodes": w.num_nodes,
           "ranks_per_node": w.ranks_per_node, "device": w.device_kind,
           "device_name": device_name(w), "backend": w.backend, "launcher": w.launcher,
           "timeout_s": w.timeout_s, "grid": {"tp": ctx.grid.tp, "pp": ctx.grid.pp, "dp": ctx.grid.dp},
           "versions": results.library_versions(), "model": ctx.args.model}
    if ctx.cfg is not None:
        import dataclasses
        man["config"] = {"model": dataclasses.asdict(ctx.cfg.model),
                         "parallel": dataclasses.asdict(ctx.cfg.parallel)}
    man.update(probe.manifest(ctx))
    return man


def device_name(world: World) -> str:
    import platform
    if world.device_kind == "cpu":
        return platform.processor() or platform.machine()
    module = __import__("torch").__dict__[world.device_kind]
    try:
        return module.get_device_name(world.device)
    except Exception:
        return world.device_kind


def run_probe(probe: Probe, argv: Sequence[str] | None = None) -> int:
    """The whole life of a probe invocation; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common_parser(probe)
    try:
        args = parser.parse_args(argv)
        validate_common(args)
        probe.validate(args)
    except UsageError as e:
        print(f"error: {probe.module}: {e}", file=sys.stderr)
        return 2
    if detect_launcher() is None:
        if args.backend == "mpi4py":
            print(f"error: {probe.module}: --backend mpi4py needs an MPI launch (mpiexec -n N python "
                  f"-m {probe.module} ...): the embedded local world has no MPI communicator",
                  file=sys.stderr)
            return 2
        # No launcher: become the parent of an embedded local world of --ranks ranks.
        return spawn_local_world(probe.module, argv, nprocs=args.ranks, timeout_s=args.timeout_s)
    try:
        return _run_rank(probe, args, argv)
    except UsageError as e:
        print(f"error: {probe.module}: {e}", file=sys.stderr)
        return 2


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


def fail_fast(module: str, ctx: Context, case: str, exc: BaseException) -> None:
    """Name the rank, host, probe and case, keep the rows, and exit without waiting on peers."""
    abort_rank(module, ctx.world, ctx.writer, f"case {case}", exc,
               row={"probe": module.rsplit(".", 1)[-1], "case": case})


def abort_rank(module: str, world: World, writer: results.RunWriter | None, what: str,
               exc: BaseException, *, row: dict[str, Any]) -> None:
    """The one way a rank gives up: a line naming module, rank, host and what failed, a
    'failed' row after the rows already written, then exit (a collective may be stuck:
    never wait on a destroy that can hang)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    msg = (f"error: {module}: rank {world.rank} on {world.hostname}: {what} failed: "
           f"{type(exc).__name__}: {text} (a peer may have died or hung; group timeout "
           f"{world.timeout_s:g} s)")
    print(msg, file=sys.stderr, flush=True)
    if os.environ.get("MICROBENCH_DEBUG"):
        traceback.print_exc()
    if writer is not None:
        writer.write_row({**row, "status": "failed", "reason": msg})
        writer.close(status="failed")
    sys.stdout.flush()
    os._exit(1)


def _run_rank(probe: Probe, args: argparse.Namespace, argv: Sequence[str]) -> int:
    world = init_world(device=args.device, backend=args.backend, timeout_s=args.timeout_s)
    ctx = probe_context(probe, args, world)
    if world.rank == 0:
        out = args.out or str(results.default_out_dir(probe.name))
        ctx.writer = results.RunWriter(out, build_manifest(probe, ctx, argv))
    rows = run_cases(probe, ctx, Timer(world))
    if ctx.writer is not None:
        footer(probe, rows)
        ctx.writer.close(status="ok")
        if not args.quiet:
            print(f"# rows: {ctx.writer.dir / results.ROWS}")
    import torch.distributed as dist
    dist.barrier(group=world.control)
    dist.destroy_process_group()
    return 0


def _fault_injection(rank: int) -> tuple[int, str] | None:
    """``MICROBENCH_FAULT=R:N[:hang]`` makes rank R die (or hang) before its case N: the tests
    of a dead and of a hung rank."""
    spec = os.environ.get("MICROBENCH_FAULT")
    if not spec:
        return None
    who, when, *how = spec.split(":")
    return (int(when or 0), how[0] if how else "die") if int(who) == rank else None


def footer(probe: Probe, rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    wrong = sum(r.get("num_wrong", 0) or 0 for r in ok)
    print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if probe.footer_metric:
        vals = [r[probe.footer_metric] for r in ok if r.get(probe.footer_metric) is not None]
        label = {"busbw_gbps": "bus bandwidth", "tflops": "TFLOP/s", "gbps": "GB/s"}.get(
            probe.footer_metric, probe.footer_metric)
        if vals:
            print(f"# Avg {label:<17}: {statistics.fmean(vals):.4g}")
        else:
            print(f"# Avg {label:<17}: n/a (no case has one)")
    unstable = sum(bool(r.get("warning")) for r in ok)
    if unstable:
        print(f"# {unstable} case(s) unstable: use more iterations (-n), pin the CPU, "
              "or keep other work off the machine")
    skipped = sum(r.get("status") == "skipped" for r in rows)
    failed = sum(r.get("status") == "failed" for r in rows)
    if skipped or failed:
        print(f"# {skipped} case(s) skipped, {failed} failed (see rows)")


def main_for(probe: Probe) -> None:
    """``if __name__ == '__main__': main_for(MyProbe())``."""
    sys.exit(run_probe(probe))
