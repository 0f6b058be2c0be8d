"""The reference 3D-parallel training step: measured step time to check the predictor against.

    mpiexec -n 4 python -m full_model.train --model tiny --tp 2 --pp 2 --steps 5
    python -m full_model.train --model tiny --dp 2 --steps 5          # embedded 2-rank world
    torchrun --nproc-per-node 12 -m full_model.train --model alcf-1t --scale 0.1 --layers 12 --tp 12

A GPT-style decoder (``full_model.model``) whose layer is the workload's op list, TP/PP/DP
from ``full_model.parallel``, the 1F1B schedule from ``full_model.schedule``, AdamW, full
recompute optional. Each iteration is logged in Megatron-DeepSpeed's ``key=value`` line (one
parser reads both) and written as a result row with per-phase timers (forward, backward,
p2p_wait, dp_sync, optimizer: max over ranks, as Megatron's timers report); the last row is a
summary: median step time over the iterations after ``--warmup-steps``, with its spread.

What bounds it: on CPU/gloo at tiny sizes, the GEMMs and the framework's per-op overhead; at
real sizes, whatever the predictor says — that is the point of running it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Sequence

from microbench import results
from microbench.cli import ArgumentParser
from microbench.config import PRESETS, ModelConfig, TrainConfig, preset, with_layout
from microbench.workload import megatron_lm_flop
from microbench.harness import (Context, Probe, Timer, abort_rank, build_manifest, stability_warning, summarize,
                                torch_dtype)
from microbench.lifecycle import RUN, install_signal_handlers, usage_exit
from microbench.options import MAX_TIMEOUT_S, check_out
from microbench.runtime import (BACKENDS, DEVICES, EMBEDDED_ENV, Grid, UsageError, detect_launcher,
                                init_world, launched_rank, spawn_local_world)

PROBE = "full_model.train"
PHASES = ("forward", "backward", "p2p_wait", "dp_sync", "optimizer")
MOTIF_LEN = 16  # synthetic data: Zipf-distributed motifs repeated along the sequence


# ---------------------------------------------------------------------------------------------
# Configuration


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=f"python -m {PROBE}", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help=f"preset: {', '.join(PRESETS)}")
    for flag, what in (("layers", "num_layers"), ("hidden", "hidden"), ("heads", "num_heads"),
                       ("kv-heads", "num_kv_heads"), ("ffn", "ffn_hidden"), ("seq", "seq_len"),
                       ("vocab", "vocab_size")):
        ap.add_argument(f"--{flag}", type=int, help=f"override the preset's {what}")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="override the preset's dtype")
    ap.add_argument("--scale", type=float, default=None,
                    help="width factor F: heads (hence hidden, head dim kept), kv heads and FFN × F, "
                         "rounded to multiples of tp; layers/seq/vocab unchanged (use --layers, --seq)")
    for flag, what in (("tp", "tensor-parallel size"), ("pp", "pipeline stages"),
                       ("dp", "data-parallel size (default world / (tp·pp))"), ("mbs", "micro-batch size"),
                       ("gbs", "global batch (default: the preset's micro-batches per pipeline)")):
        ap.add_argument(f"--{flag}", type=int, help=what)
    ap.add_argument("--recompute", choices=("none", "full"), default="none", help="activation recompute")
    ap.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism")
    ap.add_argument("--zero", type=int, choices=(0, 1), default=0, help="ZeRO stage (0 allreduce, 1 sharded optimizer)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DP gradient bucket size in MiB (2^20 bytes), as in the probes' --bucket-mb")
    ap.add_argument("--steps", type=int, default=5, help="training iterations")
    ap.add_argument("--warmup-steps", type=int, default=1, help="iterations left out of the summary")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    ap.add_argument("--seed", type=int, default=1234, help="global seed: weights and data")
    ap.add_argument("--out", default=None, help="run directory (default results/full_model.train-<time>)")
    ap.add_argument("--ranks", type=int, default=None, help="embedded world size when no launcher (default tp·pp·dp)")
    ap.add_argument("--backend", default="auto", help="|".join(BACKENDS))
    ap.add_argument("--device", default="auto", help="|".join(DEVICES))
    ap.add_argument("--timeout-s", type=float, default=300.0, help="timeout of every process group (s)")
    ap.add_argument("--quiet", action="store_true", help="no iteration lines on standard output")
    return ap


def scaled(model: ModelConfig, factor: float, tp: int) -> ModelConfig:
    """Width-scaled model (see --scale): keeps head dim, heads/kv heads/ffn divisible by tp."""
    def mult(x: float, k: int) -> int:
        return max(k, int(round(x / k)) * k)
    heads = mult(model.num_heads * factor, tp)
    kv = mult(model.num_kv_heads * factor, tp)
    while heads % kv:
        kv -= tp
    return dataclasses.replace(model, name=f"{model.name}x{factor:g}", num_heads=heads, num_kv_heads=kv,
                               hidden=heads * model.head_dim, ffn_hidden=mult(model.ffn_hidden * factor, tp))


def config_from_args(a: argparse.Namespace, *, world_size: int | None) -> TrainConfig:
    if a.model not in PRESETS:
        raise UsageError(f"--model {a.model!r}: unknown preset; known: {', '.join(PRESETS)}")
    tp, pp = a.tp or 1, a.pp or 1
    dp = a.dp if a.dp is not None else max(1, (world_size or tp * pp) // (tp * pp))
    for flag, v in (("tp", tp), ("pp", pp), ("dp", dp), ("mbs", a.mbs), ("gbs", a.gbs), ("steps", a.steps)):
        if v is not None and v < 1:
            raise UsageError(f"--{flag} {v}: must be a positive integer")
    if a.warmup_steps < 0 or a.warmup_steps >= a.steps:
        raise UsageError(f"--warmup-steps {a.warmup_steps}: must be ≥ 0 and < --steps ({a.steps})")
    base = preset(a.model)
    dims = dict(num_layers=a.layers, hidden=a.hidden, num_heads=a.heads, num_kv_heads=a.kv_heads,
                ffn_hidden=a.ffn, seq_len=a.seq, vocab_size=a.vocab, dtype=a.dtype)
    try:
        if a.scale is not None:
            if not a.scale > 0:
                raise ValueError(f"--scale {a.scale}: must be > 0")
            base = dataclasses.replace(base, model=scaled(base.model, a.scale, tp))
        cfg = with_layout(base, **dims, tp=tp, pp=pp, dp=dp, micro_batch=a.mbs, global_batch=a.gbs,
                          interleave=1, recompute=a.recompute, sequence_parallel=a.sequence_parallel,
                          zero_stage=a.zero)
    except ValueError as e:
        raise UsageError(f"--model {a.model} --tp {tp} --pp {pp} --dp {dp}: {e}") from None
    if cfg.parallel.sequence_parallel and cfg.model.seq_len % tp:
        raise UsageError(f"--sequence-parallel shards the sequence: seq_len({cfg.model.seq_len}) % tp({tp}) ≠ 0")
    if world_size is not None:
        try:
            cfg.parallel.check_world(world_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Data and timers


def synthetic_batch(cfg: TrainConfig, *, seed: int, step: int):
    """The global batch of step ``step``: [gbs, s + 1] tokens, identical on every rank and
    layout. Zipf-distributed motifs repeated along the sequence, so the loss can fall (unigram
    statistics first, copying later) instead of sitting at ln V on uniform noise."""
    import torch
    m, p = cfg.model, cfg.parallel
    g = torch.Generator().manual_seed(seed * 7919 + step)
    zipf = 1.0 / torch.arange(1, m.vocab_size + 1, dtype=torch.float64)
    motifs = torch.multinomial(zipf, p.global_batch * MOTIF_LEN, replacement=True, generator=g)
    motifs = motifs.view(p.global_batch, MOTIF_LEN)
    reps = math.ceil((m.seq_len + 1) / MOTIF_LEN)
    return motifs.repeat(1, reps)[:, :m.seq_len + 1].contiguous()


class PhaseClock:
    """Accumulates wall time per phase; synchronizes the device at both ends of a phase."""

    def __init__(self, timer: Timer):
        self.timer = timer
        self.totals = dict.fromkeys(PHASES, 0.0)

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.timer.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timer.sync()
            self.totals[phase] += time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The run


class _TrainManifest(Probe):
    """Lets the harness build the run manifest (devices, versions, env) for the training run."""

    name = PROBE
    module = PROBE

    def __init__(self, extra: dict[str, Any]):
        self.extra = extra

    def manifest(self, ctx: Context) -> dict[str, Any]:
        return self.extra


def train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch
    import torch.distributed as dist

    from .model import Stage, activation_shape
    from .parallel import P2P, AdamW, FlatOptimizer, Groups, TPOps
    from .schedule import one_f_one_b
    from .logparse import format_iteration_line

    world = init_world(device=args.device, backend=args.backend, timeout_s=args.timeout_s)
    RUN.rank, RUN.world_size, RUN.store = world.rank, world.world_size, world.store
    cfg = config_from_args(args, world_size=world.world_size)
    m, p = cfg.model, cfg.parallel
    grid = Grid(tp=p.tp, pp=p.pp, dp=p.dp)
    groups = Groups.build(world, grid)
    torch.manual_seed(args.seed)
    dtype = torch_dtype(m.dtype)
    ops = TPOps(groups, sequence_parallel=p.sequence_parallel, vocab_per_rank=m.vocab_size // p.tp)
    stage = Stage(cfg, ops, stage=groups.stage, seed=args.seed, dtype=dtype, device=world.device,
                  recompute=p.recompute)
    sp_norms = {n for n, _ in stage.named_parameters() if "norm" in n} if ops.sequence_parallel else set()
    bucket = max(1, int(args.bucket_mb * (1 << 20) * 8 / torch.finfo(torch_dtype(p.grad_dtype)).bits))  # MiB → elements
    opt = FlatOptimizer(list(stage.named_parameters()), groups, zero_stage=p.zero_stage,
                        grad_dtype=torch_dtype(p.grad_dtype), bucket_numel=bucket,
                        adam=AdamW(lr=args.lr), sp_params=sp_norms)
    timer = Timer(world)
    clock = PhaseClock(timer)
    p2p = P2P(groups, activation_shape(cfg), dtype=dtype, device=world.device, clock=clock)

    writer = None
    if world.rank == 0:
        extra = {"seed": args.seed, "steps": args.steps, "warmup_steps": args.warmup_steps,
                 "optimizer": dataclasses.asdict(AdamW(lr=args.lr)), "bucket_numel": bucket,
                 "data": f"synthetic: Zipf motifs of {MOTIF_LEN} tokens repeated, seed {args.seed}",
                 "schedule": "1f1b", "dp_overlap": False,  # DP sync runs after the last backward
                 "timing": timer.method, "num_microbatches": p.num_microbatches,
                 "stage_params": [cfg.stage_params(s) for s in range(p.pp)]}
        ctx = Context(args=args, world=world, cfg=cfg, grid=grid)
        writer = results.RunWriter(args.out or results.default_out_dir(PROBE),
                                   build_manifest(_TrainManifest(extra), ctx, argv))
        RUN.writer = writer
        if not args.quiet:
            print(f"# {PROBE}: {m.name} L{m.num_layers} d{m.hidden} s{m.seq_len} {m.dtype}; tp {p.tp} pp {p.pp} "
                  f"dp {p.dp} mbs {p.micro_batch} gbs {p.global_batch} ({p.num_microbatches} micro-batches), "
                  f"recompute {p.recompute}, sp {p.sequence_parallel}, zero {p.zero_stage}; "
                  f"{world.world_size} ranks, {world.backend} on {world.device_kind}, launcher {world.launcher}",
                  flush=True)

    per_dp = p.num_microbatches * p.micro_batch
    flop = megatron_lm_flop(cfg)
    step_times, timer_rows, losses, rank_timers = [], [], [], []
    current = "setup"
    try:
        for it in range(1, args.steps + 1):
            current = f"iteration {it}"
            data = synthetic_batch(cfg, seed=args.seed, step=it)[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]
            data = data.to(world.device)

            def forward(i: int, x):
                mb = data[i * p.micro_batch:(i + 1) * p.micro_batch]
                with clock("forward"):
                    y = stage(x, tokens=mb[:, :-1] if stage.first else None,
                              labels=mb[:, 1:] if stage.last else None)
                    return y / p.num_microbatches if stage.last else y

            def backward(y, grad, x):
                with clock("backward"):
                    torch.autograd.backward(y, grad)
                return x.grad if x is not None else None

            timer.sync()
            dist.barrier(group=world.control)  # outside the timed region
            clock.reset()
            t0 = time.perf_counter()
            opt.zero_grad()
            mb_losses = one_f_one_b(num_microbatches=p.num_microbatches, stage=groups.stage,
                                    num_stages=p.pp, p2p=p2p, forward=forward, backward=backward)
            with clock("dp_sync"):
                opt.sync_grads()
            with clock("optimizer"):
                opt.step()
            with clock("dp_sync"):
                opt.gather_params()
            timer.sync()
            step_s = time.perf_counter() - t0
            loss = float(sum(mb_losses)) if mb_losses else 0.0  # the losses were scaled by 1/m
            reporter = stage.last and groups.tp_rank == 0
            mine = torch.tensor([step_s, *(clock.totals[k] for k in PHASES), loss if reporter else 0.0],
                                dtype=torch.float64)
            every = [torch.empty_like(mine) for _ in range(world.world_size)]
            dist.all_gather(every, mine, group=world.control)
            allr = torch.stack(every)
            step_s = float(allr[:, 0].max())
            timers_us = {k: float(allr[:, 1 + j].max()) * 1e6 for j, k in enumerate(PHASES)}
            timers_mean = {k: float(allr[:, 1 + j].mean()) * 1e6 for j, k in enumerate(PHASES)}
            lm_loss = float(allr[:, -1].sum()) / p.dp
            if not math.isfinite(lm_loss):
                raise FloatingPointError(f"lm loss is {lm_loss} at iteration {it}")
            step_times.append(step_s)
            timer_rows.append(timers_us)
            rank_timers.append(allr[:, 1:1 + len(PHASES)] * 1e6)
            losses.append(lm_loss)
            if writer is not None:
                tflops = flop / step_s / 1e12 / world.world_size
                row = {"probe": PROBE, "case": f"iteration{it}", "kind": "train_step", "status": "ok",
                       "iteration": it, "is_warmup": it <= args.warmup_steps,
                       "time_us": step_s * 1e6, "timers_us": timers_us, "timers_us_rank_mean": timers_mean,
                       "lm_loss": lm_loss, "tflops": tflops,
                       "samples_per_second": p.global_batch / step_s,
                       "tokens_per_gpu_per_second": p.global_batch * m.seq_len / step_s / world.world_size,
                       **layout_fields(cfg, world)}
                writer.write_row(row)
                if not args.quiet:
                    print(format_iteration_line(
                        it, train_iters=args.steps, elapsed_ms=step_s * 1e3, global_batch_size=p.global_batch,
                        lm_loss=lm_loss, samples_per_second=row["samples_per_second"],
                        tokens_per_gpu_per_second=row["tokens_per_gpu_per_second"], tflops_lm=tflops,
                        consumed_samples=it * p.global_batch, seq_len=m.seq_len, learning_rate=args.lr,
                        timestamp=True), flush=True)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as e:
        abort_rank(PROBE, world, writer, current, e,
                   row={"probe": PROBE, "case": current, "kind": "train_step"})

    if writer is not None:
        summary = summary_row(cfg, world, step_times, timer_rows, losses, warmup=args.warmup_steps,
                              rank_timers=rank_timers)
        writer.write_row(summary)
        writer.close(status="ok")
        if not args.quiet:
            print(f"# step time {summary['time_us_median'] / 1e3:.2f} ms median over {summary['iters']} "
                  f"iterations (min {summary['time_us_min'] / 1e3:.2f}, max {summary['time_us_max'] / 1e3:.2f}, "
                  f"stdev {summary['time_us_stdev'] / 1e3:.2f}); timers (ms) "
                  + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in summary["timers_us"].items()))
            if summary.get("warning"):
                print(f"#   unstable: {summary['warning']}")
            print(f"# rows: {writer.dir / results.ROWS}", flush=True)
    dist.barrier(group=world.control)
    dist.destroy_process_group()
    return 0


def layout_fields(cfg: TrainConfig, world) -> dict[str, Any]:
    m, p = cfg.model, cfg.parallel
    return {"model": m.name, "tp": p.tp, "pp": p.pp, "dp": p.dp, "micro_batch": p.micro_batch,
            "global_batch": p.global_batch, "num_microbatches": p.num_microbatches, "seq_len": m.seq_len,
            "recompute": p.recompute, "sequence_parallel": p.sequence_parallel, "zero_stage": p.zero_stage,
            "dtype": m.dtype, "world_size": world.world_size, "device": world.device_kind,
            "backend": world.backend}


def summary_row(cfg: TrainConfig, world, step_times: list[float], timer_rows: list[dict[str, float]],
                losses: list[float], *, warmup: int, rank_timers: list | None = None) -> dict[str, Any]:
    """Median step time (and per-phase medians) over the iterations after the warm-up.

    ``timers_us`` takes each phase's max over ranks (Megatron's convention: the phases then
    over-count the step). ``timers_us_bottleneck`` are the phases of one rank — the one with
    the most forward + backward time, i.e. the slowest pipeline stage — which add up to about
    the step, so they can stand beside a predicted breakdown."""
    import torch
    kept = [t * 1e6 for t in step_times[warmup:]]
    stats = summarize(kept)
    row = {"probe": PROBE, "case": "summary", "kind": "train_summary", "status": "ok",
           "iters": len(kept), "warmup": warmup, "statistic": "median", "time_us": stats["time_us_median"],
           **stats, "time_us_samples": [round(x, 3) for x in kept],
           "warmup_us_samples": [round(t * 1e6, 3) for t in step_times[:warmup]],
           "timers_us": {k: statistics.median(r[k] for r in timer_rows[warmup:]) for k in PHASES},
           "lm_loss": losses[-1], "lm_loss_per_iteration": losses,
           "tflops": megatron_lm_flop(cfg) / (stats["time_us_median"] / 1e6) / 1e12 / world.world_size,
           **layout_fields(cfg, world)}
    if rank_timers:
        per = torch.stack(rank_timers[warmup:])  # [iters, world, phases]
        busy = per[:, :, 0] + per[:, :, 1]
        r = int(busy.sum(dim=0).argmax())
        row["bottleneck_rank"] = r
        row["timers_us_bottleneck"] = {k: statistics.median(per[:, r, j].tolist()) for j, k in enumerate(PHASES)}
    warning = stability_warning(stats, len(kept))
    if warning:
        row["warning"] = warning
    return row


MIN_BUCKET_MB = 0.001  # 1 KB: below it a bucket holds a handful of elements, one collective each


def validate_numbers(args: argparse.Namespace) -> None:
    """Finite, positive numbers before any rank starts (``--lr nan`` would train on NaN)."""
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a finite number > 0")
    if not (math.isfinite(args.bucket_mb) and args.bucket_mb >= MIN_BUCKET_MB):
        raise UsageError(f"--bucket-mb {args.bucket_mb}: must be a finite size ≥ {MIN_BUCKET_MB} MB")
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
        raise UsageError(f"--scale {args.scale}: must be a finite number > 0")
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks {args.ranks}: must be ≥ 1")
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:
        raise UsageError(f"--timeout-s {args.timeout_s}: must be > 0 and ≤ {MAX_TIMEOUT_S:g} "
                         "(a finite number of seconds)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    RUN.module, RUN.rank = PROBE, launched_rank()
    RUN.announce = RUN.rank == 0 and not os.environ.get(EMBEDDED_ENV)
    install_signal_handlers()
    args = build_parser().parse_args(argv)
    try:
        validate_numbers(args)
        cfg = config_from_args(args, world_size=None)
        info = detect_launcher()
        ranks = args.ranks or cfg.parallel.world_size
        world_size = (ranks if ranks > 1 else 1) if info is None else info.world_size
        if world_size is not None:
            config_from_args(args, world_size=world_size)  # the layout against the world
        if args.out is not None:
            check_out(args.out)
        elif info is None and ranks > 1:  # the parent names the run directory, so it can close it
            args.out = str(results.default_out_dir(PROBE))
            argv = [*argv, "--out", args.out]
    except UsageError as e:
        return usage_exit(str(e))
    if info is None and ranks > 1:
        # No launcher: become the parent of an embedded local world.
        return spawn_local_world(PROBE, argv, nprocs=ranks, timeout_s=args.timeout_s, run_dir=args.out)
    try:
        return train(args, argv)
    except UsageError as e:
        return usage_exit(str(e), after_init=True)


if __name__ == "__main__":
    sys.exit(main())
