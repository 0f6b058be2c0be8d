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
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .cli import ArgumentParser
from . import results
from .config import PRESETS, preset, with_layout
from .harness import (Probe, Timer, build_manifest, common_parser, layout_config, make_grid,
                      probe_context, run_cases, validate_common, validate_run_flags)
from .workload import workload
from .lifecycle import RUN, finish, install_signal_handlers, outcome, usage_exit
from .options import check_out
from .runtime import (BACKENDS, DEVICES, EMBEDDED_ENV, UsageError, detect_launcher, init_world,
                      launched_rank, spawn_local_world)

MODULE = "microbench"


@dataclass(frozen=True)
class Step:
    """One probe invocation of the campaign: its module, its class and its arguments."""

    module: str
    cls: str
    argv: tuple[str, ...]
    title: str

    def probe(self) -> Probe:
        return getattr(importlib.import_module(self.module), self.cls)()


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
        Step("microbench.gemm", "Gemm", compute, "peak GEMM, GEMMs of a layer and the LM head"),
        Step("microbench.attention", "AttentionCore",
             (*compute, "--scale", f"{attention_scale(cfg, scale):g}", "--no-peak"), "attention core"),
        Step("microbench.layer_ops", "LayerOps", compute, "peak copy, memory-bound ops, AdamW"),
    ]
    W = world_size
    sweep = ("-n", n, "-w", w, "--timeout-s", str(args.timeout_s), "--device", args.device,
             "--backend", args.backend, "--quiet", "-b", "4K", "-e", sweep_max, "-f", "8")
    tp = axis_size(cfg, "tp", W, cap=ranks_per_node)
    if tp > 1:  # every TP group of the world at once, as in a step
        T = ("--tp", str(tp), "--dp", str(W // tp))
        steps += [
            Step("microbench.allreduce", "AllReduce", (*common, *T, "--place", "in"),
                 "TP allreduce of the [mbs·s, d] activation"),
            Step("microbench.allreduce", "AllReduce", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "allreduce size sweep (α–β fit)"),
            Step("microbench.allgather", "AllGather", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "allgather size sweep"),
            Step("microbench.reduce_scatter", "ReduceScatter", (*sweep, *T, "--place", "in", "--axis", "tp"),
                 "reduce-scatter size sweep"),
        ]
    pp = axis_size(cfg, "pp", W)
    if pp > 1:
        P = ("--pp", str(pp), "--dp", str(W // pp))
        steps += [
            Step("microbench.sendrecv", "SendRecv", (*common, *P), "pipeline send/recv of the activation"),
            Step("microbench.sendrecv", "SendRecv", (*sweep, *P), "send/recv size sweep"),
        ]
    if W > 1:  # DP over the whole world, the gradient sized as the target's shard
        D = ("--dp", str(W))
        steps += [
            Step("microbench.dp_allreduce", "DpAllreduce",
                 (*common, *D, "--grad-tp", str(lay.tp), "--grad-pp", str(lay.pp),
                  *(("--bucket-mb", "4", "--max-bytes", "16M") if args.quick else ("--max-bytes", "256M"))),
                 "DP gradient sync of one step"),
            Step("microbench.overlap", "Overlap", (*common, *D, "--gemm-tp", str(lay.tp),
                                                   "--scale", f"{scale:g}"),
                 "DP bucket overlapped with a backward GEMM"),
        ]
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    return [s for s in steps if (only is None or s.module.split(".")[-1] in only)
            and s.module.split(".")[-1] not in skip]


def check_steps(steps: list[Step], world_size: int) -> None:
    """Every step's arguments, layout and grid, before anything is measured (UsageError)."""
    for step in steps:
        probe = step.probe()
        pargs = common_parser(probe).parse_args(list(step.argv))
        validate_common(pargs)
        probe.validate(pargs)
        if probe.layout_matches_world:
            make_grid(pargs, world_size)
            layout_config(pargs, world_size)


TARGET_GEMM_S = 0.1  # the largest GEMM of a case should take about this long on a CPU (s)
TARGET_GEMM_S_QUICK = 0.0125
TARGET_PEAK_S = 1.0  # the square peak GEMM: longer, it is the ceiling every efficiency is against


def gemm_rate_flops(dtype: str, *, size: int = 256, reps: int = 3) -> float:
    """This CPU's matmul rate in ``dtype`` (FLOP/s): the best of ``reps`` size³ products after
    one warm-up. The dtype matters: bf16 on a CPU without AVX-512 runs ~40× slower than fp32."""
    import torch
    from .harness import torch_dtype
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
    known = {"gemm", "attention", "layer_ops", "allreduce", "allgather", "reduce_scatter",
             "sendrecv", "dp_allreduce", "overlap"}
    for flag in ("only", "skip"):
        for name in (getattr(args, flag) or "").split(","):
            if name and name not in known:
                raise UsageError(f"--{flag} {name!r}: unknown probe; known: {', '.join(sorted(known))}")
    if not args.no_predict:
        systems = os.path.join(os.path.dirname(__file__), "..", "analysis", "systems", f"{args.system}.yaml")
        if not (os.path.isfile(systems) or os.path.isfile(args.system)):
            raise UsageError(f"--system {args.system!r}: no such spec profile (see analysis/systems/)")


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
    if args.scale is None or (world.device_kind == "cpu" and not args.peak_size):
        # under a launcher: rank 0 measures, every rank uses its choice
        import torch.distributed as dist
        box: list[Any] = [None, None, None]
        if world.rank == 0:
            choose_scale(args, world.device_kind)
            box = [args.scale, args.scale_why, args.peak_size]
        dist.broadcast_object_list(box, src=0, group=world.control)
        args.scale, args.scale_why, args.peak_size = box
    steps = plan(args, world.world_size, world.device_kind, ranks_per_node=world.ranks_per_node)
    check_steps(steps, world.world_size)  # a bad step stops the run before anything is measured
    writer = None
    if world.rank == 0:
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
    timer = Timer(world)
    bar = progress(len(steps), world.rank == 0)
    manifest_done = False
    all_rows: list[dict] = []
    for step in steps:
        probe = step.probe()
        pargs = common_parser(probe).parse_args(list(step.argv))
        validate_common(pargs)
        probe.validate(pargs)
        ctx = probe_context(probe, pargs, world)
        ctx.writer = writer
        if writer is not None and not manifest_done:
            # The world-level manifest fields (hosts, devices, versions) from the first probe.
            man = build_manifest(probe, ctx, argv)
            for key in ("probe", "command", "model", "config", "grid"):
                man.pop(key, None)
            writer.update_manifest(**man)
            manifest_done = True
        t0 = time.monotonic()
        rows = run_cases(probe, ctx, timer, header=False)
        all_rows.extend(rows)
        if world.rank == 0:
            ok = sum(r.get("status") == "ok" for r in rows)
            msg = (f"#  {step.module.split('.')[-1]:<15} {step.title:<45} {ok}/{len(rows)} ok "
                   f"({time.monotonic() - t0:.1f} s)")
            if bar is not None:
                bar.write(msg)
                bar.update(1)
            else:
                print(msg, flush=True)
    if bar is not None:
        bar.close()
    import torch.distributed as dist
    dist.barrier(group=world.control)
    if writer is not None:
        finish(writer, all_rows, host=world.hostname)
    dist.destroy_process_group()
    return outcome(all_rows)[1]  # 1 when any case failed: the manifest says which


def predict_and_summarise(args: argparse.Namespace, run_dir: str) -> int:
    """Price the target with this run's measurements over the --system spec (a subprocess:
    microbench does not import analysis) and print what was measured and what specified."""
    preds = {}
    for name, extra in (("prediction", ["--profile", run_dir]), ("spec", [])):
        cmd = [sys.executable, "-m", "analysis.predict", "--model", args.model,
               "--system", args.system, *extra, "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            print(f"error: {MODULE}: prediction failed ({' '.join(cmd[1:])}): "
                  f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                  file=sys.stderr)
            return 1
        preds[name] = json.loads(res.stdout)
        with open(os.path.join(run_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(preds[name], f, indent=2)
    print(summary_text(args, preds["prediction"], run_dir, spec=preds["spec"]))
    return 0


PROVENANCE_WORDS = ("measured", "extrapolated", "specified")  # analysis.provenance's words


def summary_text(args: argparse.Namespace, pred: dict[str, Any], run_dir: str, *,
                 spec: dict[str, Any] | None = None) -> str:
    """The prediction in a few lines: how much of the step was measured, extrapolated (from
    what) and specified (file and key), component by component."""
    cfg = preset(args.model)
    p = cfg.parallel
    step = pred["step_time_s"]
    lines = [f"# prediction: {args.model} on {p.world_size} ranks (tp {p.tp} pp {p.pp} dp {p.dp}, "
             f"mbs {p.micro_batch}, gbs {p.global_batch}); system {args.system}"]
    if getattr(args, "scale_why", None):
        lines.append(f"#   compute scale : {args.scale_why}")
    lines.append(f"#   step time     : {step:.4g} s")
    words = pred.get("seconds_by_provenance", {})
    lines.append("#   of the step   : " + ", ".join(
        f"{w} {words.get(w, 0.0):.3g} s ({words.get(w, 0.0) / step:.0%})" for w in PROVENANCE_WORDS))
    per = pred.get("provenance_s", {})
    for comp, t in sorted(pred.get("breakdown_s", {}).items(), key=lambda kv: -kv[1]):
        if t <= 0:
            continue
        srcs = per.get(comp, {})
        by_word = {w: sum(v for s_, v in srcs.items() if s_.split(" ", 1)[0] == w) for w in PROVENANCE_WORDS}
        mix = " · ".join(f"{w} {v / t:.0%}" for w, v in by_word.items() if v > 0)
        lines.append(f"#   {comp:<14}: {t:.3g} s  {mix}")
        if comp == "bubble":
            continue  # the stage's own sources, listed under its components
        shown = 0
        for src, v in sorted(srcs.items(), key=lambda kv: -kv[1]):
            if src.startswith("measured"):
                continue
            if v / t < 0.01 or shown == 3:  # the rest: prediction.json (provenance_s) has them all
                rest = [x for x in srcs if not x.startswith("measured")][shown:]
                lines.append(f"#       … {len(rest)} more source(s) below 1% each or beyond the first 3 "
                             f"(prediction.json: provenance_s)")
                break
            lines.append(f"#       {v / t:>4.0%} {src}")
            shown += 1
    for key in ("peak", "memory", "overlap.tp", "overlap.dp"):
        if key in pred.get("sources", {}):
            lines.append(f"#   {key:<14}: {pred['sources'][key]}")
    for note in pred.get("notes", []):
        lines.append(f"#   note          : {note}")
    lines.append(f"#   FOM           : {pred['fom']:.4g}  (benchmark definition: (6sd²+s²d)·b·L/T)")
    lines.append(f"#   model TFLOP/s : {pred['model_tflops_per_device']:.4g} per device, "
                 f"MFU {100 * pred['mfu']:.1f}%")
    seed = pred.get("seed_model", {})
    if seed:
        lines.append(f"#   benchmark's 2-term model: {seed['step_time_s']:.4g} s "
                     f"(α {seed['alpha']:.3g} s/MAC, β {seed['beta']:.3g} s/element)")
    if spec is not None:
        lines.append(f"#   spec only     : {spec['step_time_s']:.4g} s, FOM {spec['fom']:.4g}, MFU "
                     f"{100 * spec['mfu']:.1f}% — {args.system} as specified, nothing measured here")
    lines.append(f"#   rows: {run_dir}/rows.jsonl  prediction: {run_dir}/prediction.json "
                 f"(spec only: {run_dir}/spec.json)")
    lines.append(f"#   report: python -m analysis.report {run_dir}")
    return "\n".join(lines)


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
        info = detect_launcher()
    except UsageError as e:
        return usage_exit(str(e))
    if info is None:
        try:  # every step's arguments checked before any rank starts
            import torch
            guess = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
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
