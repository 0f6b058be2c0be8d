"""The main job: every probe of a step in one process group, one run directory, a prediction.

    python -m microbench                       # alcf-1t, embedded 2-rank world on a laptop
    mpiexec -n 12 python -m microbench --model alcf-1t --out results/node0
    python -m microbench --model tiny --quick  # seconds: the test suite's run

The compute probes measure the *target* layout's per-rank shard (``--tp`` of the preset,
every rank at once); the communication probes measure the same messages on the groups this
world can form (TP, PP, DP axes of size world). Then ``analysis.predict`` prices the target
configuration with the measured parts from this run and the specified parts from
``--system`` (the network between nodes, anything not measured here), and the summary says
which is which. microbench never imports analysis: the prediction runs as its own process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from microbench.harness import registry
from microbench.harness.cli import ArgumentParser
from microbench.harness.contract import Probe
from microbench.harness.engine import probe_context, run_cases, share_from_rank0
from microbench.harness.lifecycle import RUN, build_manifest, finish, install_signal_handlers, outcome, usage_exit
from microbench.harness.modelargs import config_from_args
from microbench.harness.options import (check_out, common_parser, make_grid, validate_common,
                                        validate_run_flags)
from microbench.harness.scale import attention_scale, choose_scale
from microbench.harness.summary import predict_and_summarise
from microbench.harness.timing import Timer
from microbench.model.config import PRESETS, preset, with_layout
from microbench.model.systems import system_file
from microbench.runtime import results
from microbench.runtime.errors import UsageError
from microbench.runtime.launch import EMBEDDED_ENV, agreed_launch, launched_rank
from microbench.runtime.spawn import spawn_local_world
from microbench.runtime.world import BACKENDS, DEVICES, World, device_kind, init_world

MODULE = "microbench"
CAMPAIGN_PROBES = tuple(n for n in registry.PROBES if n not in ("peak", "alltoall", "tp_sync"))  # tp_sync: a cross-check probe (needs tp > 1)
"""What the main job runs (the peak GEMM and copy come with gemm and layer_ops; alltoall has
no place in a dense step)."""


@dataclass(frozen=True)
class Step:
    """One probe invocation of the campaign: the probe (by its registry name) and its arguments."""

    name: str
    argv: tuple[str, ...]
    title: str

    @property
    def module(self) -> str:
        return registry.module_of(self.name)

    def probe(self) -> Probe:
        return registry.probe(self.name)


def axis_size(cfg, axis: str, world_size: int, *, cap: int | None = None) -> int:
    """The largest group of ``axis`` this world can form for the model: n divides the
    world, the model's dimensions divide by n, n ≤ cap (TP stays inside a node). 1 = none."""
    for n in range(min(world_size, cap or world_size), 1, -1):
        if world_size % n:
            continue
        lay = {"tp": 1, "pp": 1, "dp": 1, axis: n}
        lay["dp"] = world_size // (lay["tp"] * lay["pp"]) if axis != "dp" else n
        try:
            with_layout(cfg, **lay)
        except ValueError:
            continue
        return n
    return 1


def plan(args: argparse.Namespace, world_size: int, device_kind: str, *,
         ranks_per_node: int | None = None) -> list[Step]:
    """The campaign for a model on this world. Sizes come from the probes' model modes,
    which take them from the workload; here only iteration counts, scale and the group
    sizes this world can form are chosen (TP inside a node, PP and DP over the rest)."""
    cfg = preset(args.model)
    n, w = (str(args.iters), str(args.warmup))
    common = ("--model", args.model, "-n", n, "-w", w, "--timeout-s", str(args.timeout_s),
              "--device", args.device, "--backend", args.backend, "--quiet")
    if args.scale is None:
        raise UsageError("plan: no compute scale chosen (choose_scale runs first)")
    scale = args.scale
    lay = cfg.parallel  # compute probes measure exactly the target's per-rank shard
    compute = (*common, "--tp", str(lay.tp), "--pp", str(lay.pp), "--dp", str(lay.dp),
               "--scale", f"{scale:g}", *(("--peak-size", str(args.peak_size)) if args.peak_size else ()))
    sweep_max = "1M" if args.quick else "64M"
    steps = [
        # gemm measures the peak square GEMM first and layer_ops the peak copy: every
        # efficiency figure has its denominator from the same run.
        Step("gemm", compute, "peak GEMM, GEMMs of a layer and the LM head"),
        Step("attention", (*compute, "--scale", f"{attention_scale(cfg, scale):g}", "--no-peak"), "attention core"),
        Step("layer_ops", compute, "peak copy, memory-bound ops, AdamW"),
        # the host's own time per layer and phase, on a layer narrowed until the device is idle,
        # and (TP > 1, more than one rank) the host's time to issue one TP reduction
        Step("host", (*common, "--tp", str(lay.tp)), "host time of a layer (Python, autograd, launches) per "
             "phase and of a TP call"),
    ]
    W = world_size
    sweep = ("-n", n, "-w", w, "--timeout-s", str(args.timeout_s), "--device", args.device,
             "--backend", args.backend, "--quiet", "-b", "4K", "-e", sweep_max, "-f", "8")
    tp = axis_size(cfg, "tp", W, cap=ranks_per_node)
    if tp > 1:  # every TP group of the world at once, as in a step
        T = ("--tp", str(tp), "--dp", str(W // tp))
        steps += [
            Step("allreduce", (*common, *T, "--place", "in"),
                 "TP allreduce of the [mbs·s, d] activation"),
            Step("allreduce", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "allreduce size sweep (α–β fit)"),
            Step("allgather", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "allgather size sweep"),
            Step("reduce_scatter", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "reduce-scatter size sweep"),
        ]
    pp = axis_size(cfg, "pp", W)
    if pp > 1:
        P = ("--pp", str(pp), "--dp", str(W // pp))
        steps += [
            Step("sendrecv", (*common, *P), "pipeline send/recv of the activation"),
            Step("sendrecv", (*sweep, *P), "send/recv size sweep"),
        ]
    if W > 1:  # DP over the whole world, the gradient sized as the target's shard
        D = ("--dp", str(W))
        steps += [
            Step("dp_allreduce", (*common, *D, "--grad-tp", str(lay.tp), "--grad-pp", str(lay.pp),
                  *(("--bucket-mb", "4", "--max-bytes", "16M") if args.quick else ("--max-bytes", "256M"))),
                 "DP gradient sync of one step"),
            Step("overlap", (*common, *D, "--gemm-tp", str(lay.tp),
                                                   "--scale", f"{scale:g}"),
                 "DP bucket overlapped with a backward GEMM"),
        ]
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    return [s for s in steps if (only is None or s.name in only) and s.name not in skip]


def check_steps(steps: list[Step], world_size: int) -> None:
    """Every step's arguments, layout and grid, before anything is measured (UsageError)."""
    for step in steps:
        probe = step.probe()
        pargs = common_parser(probe).parse_args(list(step.argv))
        validate_common(pargs)
        probe.validate(pargs)
        if probe.layout_matches_world:
            make_grid(pargs, world_size)
            config_from_args(pargs, layout="world", world_size=world_size)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m microbench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="alcf-1t", help=f"preset to measure and predict: {', '.join(PRESETS)}")
    p.add_argument("--system", default="aurora",
                   help="spec profile for what this run does not measure (analysis/systems/NAME.yaml)")
    p.add_argument("--out", default=None, help="run directory (default results/campaign-<time>)")
    p.add_argument("--quick", action="store_true", help="fewer iterations, smaller sizes (a smoke run)")
    p.add_argument("--scale", type=float, default=None,
                   help="compute-probe scale (default 1 on a GPU; on a CPU chosen from a brief "
                        "measurement of its matmul rate in the model's dtype, so the largest GEMM "
                        "takes ~0.1 s)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="size N of the square peak GEMM (default: the probe's on a GPU; on a CPU from "
                        "its measured matmul rate, ~1 s per GEMM)")
    p.add_argument("--scale-why", default=None, help=argparse.SUPPRESS)  # the parent's choice, passed on
    p.add_argument("-n", "--iters", type=int, default=None, help="timed iterations per case (default 10, 3 quick)")
    p.add_argument("-w", "--warmup", type=int, default=None, help="warm-up iterations (default 2, 1 quick)")
    p.add_argument("--only", default=None, help="comma list of probes to run (e.g. gemm,allreduce)")
    p.add_argument("--skip", default=None, help="comma list of probes to leave out")
    p.add_argument("--no-predict", action="store_true", help="measure only")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the embedded world when no launcher is found")
    p.add_argument("--device", default="auto", help="|".join(DEVICES))
    p.add_argument("--backend", default="auto", help="|".join(BACKENDS))
    p.add_argument("--timeout-s", type=float, default=300.0, help="timeout of every process group (s)")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.model not in PRESETS:
        raise UsageError(f"--model {args.model!r}: unknown preset; known: {', '.join(PRESETS)}")
    if args.scale is not None and not 0 < args.scale <= 1:
        raise UsageError(f"--scale {args.scale:g}: must be in (0, 1]")
    if args.scale is not None and args.scale_why is None:
        args.scale_why = f"{args.scale:g}: given with --scale"
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    validate_run_flags(args, backends=[b for b in BACKENDS if b != "mpi4py"])
    known = CAMPAIGN_PROBES
    for flag in ("only", "skip"):
        for name in (getattr(args, flag) or "").split(","):
            if name and name not in known:
                raise UsageError(f"--{flag} {name!r}: unknown probe; known: {', '.join(sorted(known))}")
    if not args.no_predict:
        try:
            system_file(args.system)
        except ValueError as e:
            raise UsageError(f"--system: {e}") from None


def progress(total: int, enabled: bool):
    """tqdm on rank 0 when standard error is a terminal, else nothing."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="probe", file=sys.stderr)


def run_rank(args: argparse.Namespace, argv: Sequence[str]) -> int:
    world = init_world(device=args.device, backend=args.backend, timeout_s=args.timeout_s)
    RUN.rank, RUN.world_size, RUN.store = world.rank, world.world_size, world.store
    RUN.launched = world.launcher != "embedded"
    if args.scale is None or (world.device_kind == "cpu" and not args.peak_size):
        _agree_on_scale(args, world)
    steps = plan(args, world.world_size, world.device_kind, ranks_per_node=world.ranks_per_node)
    check_steps(steps, world.world_size)  # a bad step stops the run before anything is measured
    writer = _open_campaign(args, argv, world, steps) if world.rank == 0 else None
    RUN.run_dir = Path(share_from_rank0(world, str(writer.dir) if writer else None))
    timer = Timer(world)
    bar = progress(len(steps), world.rank == 0)
    all_rows: list[dict] = []
    for i, step in enumerate(steps):
        probe = step.probe()
        pargs = common_parser(probe).parse_args(list(step.argv))
        validate_common(pargs)
        probe.validate(pargs)
        ctx = probe_context(probe, pargs, world)
        ctx.writer = writer
        if writer is not None and i == 0:
            # The world-level manifest fields (hosts, devices, versions) from the first probe.
            man = build_manifest(probe, ctx, argv)
            for key in ("probe", "command", "model", "config", "grid"):
                man.pop(key, None)
            writer.update_manifest(**man)
        t0 = time.monotonic()
        rows = run_cases(probe, ctx, timer, header=False)
        all_rows.extend(rows)
        if world.rank == 0:
            _report_step(step, rows, time.monotonic() - t0, bar)
    if bar is not None:
        bar.close()
    import torch.distributed as dist
    dist.barrier(group=world.control)
    if writer is not None:
        finish(writer, all_rows, host=world.hostname)
    dist.destroy_process_group()
    return outcome(all_rows)[1]  # 1 when any case failed: the manifest says which


def _agree_on_scale(args: argparse.Namespace, world: World) -> None:
    """Under a launcher: rank 0 measures the compute scale, every rank uses its choice."""
    import torch.distributed as dist
    box: list[Any] = [None, None, None]
    if world.rank == 0:
        choose_scale(args, world.device_kind)
        box = [args.scale, args.scale_why, args.peak_size]
    dist.broadcast_object_list(box, src=0, group=world.control)
    args.scale, args.scale_why, args.peak_size = box


def _open_campaign(args: argparse.Namespace, argv: Sequence[str], world: World,
                   steps: list[Step]) -> results.RunWriter:
    """Rank 0: the campaign's run directory (its manifest lists every step) and one line."""
    args.out = args.out or str(results.default_out_dir("campaign"))
    writer = results.RunWriter(args.out, {
        "probe": "campaign", "command": [sys.executable, "-m", MODULE, *argv],
        "model": args.model, "system": args.system, "quick": args.quick,
        "compute_scale": {"value": args.scale, "peak_size": args.peak_size, "why": args.scale_why},
        "steps": [{"probe": s.module, "argv": list(s.argv), "title": s.title} for s in steps]})
    RUN.writer = writer
    print(f"# microbench campaign: model {args.model}, world {world.world_size} "
          f"({world.num_nodes} node(s)), {world.device_kind}/{world.backend}, "
          f"launcher {world.launcher}, {len(steps)} probe runs → {writer.dir}", flush=True)
    return writer


def _report_step(step: Step, rows: list[dict], seconds: float, bar) -> None:
    ok = sum(r.get("status") == "ok" for r in rows)
    msg = f"#  {step.module.split('.')[-1]:<15} {step.title:<45} {ok}/{len(rows)} ok ({seconds:.1f} s)"
    if bar is not None:
        bar.write(msg)
        bar.update(1)
    else:
        print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    RUN.module, RUN.rank = MODULE, launched_rank()
    RUN.announce = RUN.rank == 0 and not os.environ.get(EMBEDDED_ENV)
    install_signal_handlers()
    try:
        args = parser().parse_args(argv)
        validate(args)
        if args.out is not None:
            check_out(args.out)
        info = agreed_launch(timeout_s=args.timeout_s)
    except UsageError as e:
        return usage_exit(e)
    if info is None:
        try:  # every step's arguments checked before any rank starts
            guess = device_kind(args.device)  # the kind every rank will bind (xpu, cuda or cpu)
            if args.scale is None or (guess == "cpu" and not args.peak_size):  # once here, for every rank
                choose_scale(args, guess)
                argv = [*argv, "--scale", repr(args.scale), "--scale-why", args.scale_why,
                        *(("--peak-size", str(args.peak_size)) if args.peak_size else ())]
                print(f"# compute scale {args.scale_why}", flush=True)
            check_steps(plan(args, args.ranks, guess, ranks_per_node=args.ranks), args.ranks)
        except UsageError as e:
            print(f"error: {MODULE}: {e}", file=sys.stderr)
            return 2
        if args.out is None:  # the parent names the directory so it can predict from it
            args.out = str(results.default_out_dir("campaign"))
            argv = [*argv, "--out", args.out]
        code = spawn_local_world(MODULE, argv, nprocs=args.ranks, timeout_s=args.timeout_s,
                                 run_dir=args.out)
        if code != 0 or args.no_predict:
            return code
        return predict_and_summarise(args, args.out)
    try:
        code = run_rank(args, argv)
    except UsageError as e:
        return usage_exit(str(e), after_init=True)
    if code == 0 and info.rank == 0 and info.launcher != "embedded" and not args.no_predict:
        return predict_and_summarise(args, args.out)
    return code
