"""One run of the reference 3D-parallel training step, as named steps: build this rank's stage
and optimizer, open the run (rank 0), then per iteration the timed step, its timers gathered
over ranks, a result row and a Megatron-style log line; last, the summary row.

The command line, its checks and the embedded world live in the door, ``full_model.train``;
this module is what every rank runs once its world and configuration are known.

Timers (``PHASES``, the vocabulary's ``REFERENCE_TIMERS``): wall time per phase, the device
synchronized at both ends of a phase, max over ranks as Megatron's timers report; the step
time is the max over ranks of the whole iteration.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from full_model.megatron.logparse import format_iteration_line
from full_model.reference import PROBE
from full_model.reference.model import Stage, activation_shape
from full_model.reference.parallel import P2P, AdamW, FlatOptimizer, Groups, TPOps
from full_model.reference.schedule import one_f_one_b
from microbench.harness.contract import Context, Probe
from microbench.harness.lifecycle import RUN, abort_rank, build_manifest
from microbench.harness.options import torch_dtype
from microbench.harness.timing import Timer, stability_warning, summarize
from microbench.model.config import TrainConfig
from microbench.model.grid import Grid
from microbench.model.metrics import megatron_tflops
from microbench.model.vocabulary import REFERENCE_TIMERS
from microbench.runtime import results
from microbench.runtime.errors import UsageError
from microbench.runtime.world import World

PHASES = tuple(REFERENCE_TIMERS)  # forward, backward, p2p_wait, dp_sync, optimizer: the vocabulary's
MOTIF_LEN = 16  # synthetic data: Zipf-distributed motifs repeated along the sequence


# ---------------------------------------------------------------------------------------------
# Data and timers


def synthetic_batch(cfg: TrainConfig, *, seed: int, step: int) -> torch.Tensor:
    """The global batch of step ``step``: [gbs, s + 1] tokens, identical on every rank and
    layout. Zipf-distributed motifs repeated along the sequence, so the loss can fall (unigram
    statistics first, copying later) instead of sitting at ln V on uniform noise."""
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
# Build


@dataclass
class Trainer:
    """What one rank trains with: its stage of the model, optimizer, p2p and clocks."""

    world: World
    cfg: TrainConfig
    grid: Grid
    groups: Groups
    stage: Stage
    opt: FlatOptimizer
    timer: Timer
    clock: PhaseClock
    p2p: P2P
    bucket_numel: int


def build(args: argparse.Namespace, world: World, cfg: TrainConfig) -> Trainer:
    """This rank's groups, stage (seeded weights), optimizer with its DP buckets, and p2p."""
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
    return Trainer(world=world, cfg=cfg, grid=grid, groups=groups, stage=stage, opt=opt, timer=timer,
                   clock=clock, p2p=p2p, bucket_numel=bucket)


class _TrainManifest(Probe):
    """Lets the harness build the run manifest (devices, versions, env) for the training run."""

    name = PROBE
    module = PROBE

    def __init__(self, extra: dict[str, Any]):
        self.extra = extra

    def manifest(self, ctx: Context) -> dict[str, Any]:
        return self.extra


def open_run(args: argparse.Namespace, argv: Sequence[str], tr: Trainer) -> results.RunWriter:
    """Rank 0: the run directory and its manifest (what was trained, how it was timed), and
    the one header line."""
    cfg, world = tr.cfg, tr.world
    m, p = cfg.model, cfg.parallel
    extra = {"seed": args.seed, "steps": args.steps, "warmup_steps": args.warmup_steps,
             "optimizer": dataclasses.asdict(AdamW(lr=args.lr)), "bucket_numel": tr.bucket_numel,
             "data": f"synthetic: Zipf motifs of {MOTIF_LEN} tokens repeated, seed {args.seed}",
             "schedule": "1f1b", "dp_overlap": False,  # DP sync runs after the last backward
             "timing": tr.timer.method, "num_microbatches": p.num_microbatches,
             "stage_params": [cfg.stage_params(s) for s in range(p.pp)]}
    ctx = Context(args=args, world=world, cfg=cfg, grid=tr.grid)
    writer = results.RunWriter(args.out or results.default_out_dir(PROBE),
                               build_manifest(_TrainManifest(extra), ctx, argv))
    RUN.writer = writer
    if not args.quiet:
        print(f"# {PROBE}: {m.name} L{m.num_layers} d{m.hidden} s{m.seq_len} {m.dtype}; tp {p.tp} pp {p.pp} "
              f"dp {p.dp} mbs {p.micro_batch} gbs {p.global_batch} ({p.num_microbatches} micro-batches), "
              f"recompute {p.recompute}, sp {p.sequence_parallel}, zero {p.zero_stage}; "
              f"{world.world_size} ranks, {world.backend} on {world.device_kind}, launcher {world.launcher}",
              flush=True)
    return writer


# ---------------------------------------------------------------------------------------------
# One iteration


@dataclass
class Iteration:
    """One iteration as every rank agrees on it (gathered over the control group)."""

    step_s: float
    """Max over ranks."""
    timers_us: dict[str, float]
    """Each phase's max over ranks."""
    timers_us_rank_mean: dict[str, float]
    rank_timers_us: torch.Tensor
    """[world, phases]."""
    lm_loss: float


def timed_step(tr: Trainer, data: torch.Tensor) -> tuple[float, float]:
    """The timed region: 1F1B over the micro-batches, DP gradient sync, optimizer, parameter
    gather; (this rank's seconds, its summed micro-batch losses — 0 off the last stage)."""
    p, stage, clock = tr.cfg.parallel, tr.stage, tr.clock

    def forward(i: int, x):
        mb = data[i * p.micro_batch:(i + 1) * p.micro_batch]
        with clock("forward"):
            y = stage(x, tokens=mb[:, :-1] if stage.first else None, labels=mb[:, 1:] if stage.last else None)
            return y / p.num_microbatches if stage.last else y

    def backward(y, grad, x):
        with clock("backward"):
            torch.autograd.backward(y, grad)
        return x.grad if x is not None else None

    tr.timer.sync()
    dist.barrier(group=tr.world.control)  # outside the timed region
    clock.reset()
    t0 = time.perf_counter()
    tr.opt.zero_grad()
    mb_losses = one_f_one_b(num_microbatches=p.num_microbatches, stage=tr.groups.stage,
                            num_stages=p.pp, p2p=tr.p2p, forward=forward, backward=backward)
    with clock("dp_sync"):
        tr.opt.sync_grads()
    with clock("optimizer"):
        tr.opt.step()
    with clock("dp_sync"):
        tr.opt.gather_params()
    tr.timer.sync()
    return time.perf_counter() - t0, float(sum(mb_losses)) if mb_losses else 0.0  # losses scaled by 1/m


def one_iteration(tr: Trainer, args: argparse.Namespace, it: int) -> Iteration:
    """This rank's share of step ``it``'s batch, the timed step, then every rank's times and
    the loss gathered: the step is the slowest rank's, the loss the last stage's (mean over DP)."""
    p = tr.cfg.parallel
    per_dp = p.num_microbatches * p.micro_batch
    dp_rank = tr.groups.dp_rank
    data = synthetic_batch(tr.cfg, seed=args.seed, step=it)[dp_rank * per_dp:(dp_rank + 1) * per_dp]
    step_s, loss = timed_step(tr, data.to(tr.world.device))
    reporter = tr.stage.last and tr.groups.tp_rank == 0
    mine = torch.tensor([step_s, *(tr.clock.totals[k] for k in PHASES), loss if reporter else 0.0],
                        dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(tr.world.world_size)]
    dist.all_gather(every, mine, group=tr.world.control)
    allr = torch.stack(every)
    lm_loss = float(allr[:, -1].sum()) / p.dp
    if not math.isfinite(lm_loss):
        raise FloatingPointError(f"lm loss is {lm_loss} at iteration {it}")
    return Iteration(step_s=float(allr[:, 0].max()),
                     timers_us={k: float(allr[:, 1 + j].max()) * 1e6 for j, k in enumerate(PHASES)},
                     timers_us_rank_mean={k: float(allr[:, 1 + j].mean()) * 1e6 for j, k in enumerate(PHASES)},
                     rank_timers_us=allr[:, 1:1 + len(PHASES)] * 1e6, lm_loss=lm_loss)


def layout_fields(cfg: TrainConfig, world) -> dict[str, Any]:
    m, p = cfg.model, cfg.parallel
    return {"model": m.name, "tp": p.tp, "pp": p.pp, "dp": p.dp, "micro_batch": p.micro_batch,
            "global_batch": p.global_batch, "num_microbatches": p.num_microbatches, "seq_len": m.seq_len,
            "recompute": p.recompute, "sequence_parallel": p.sequence_parallel, "zero_stage": p.zero_stage,
            "dtype": m.dtype, "world_size": world.world_size, "device": world.device_kind,
            "backend": world.backend}


def iteration_row(tr: Trainer, x: Iteration, *, it: int, warmup: int) -> dict[str, Any]:
    cfg, world = tr.cfg, tr.world
    p = cfg.parallel
    return {"probe": PROBE, "case": f"iteration{it}", "kind": "train_step", "status": "ok",
            "iteration": it, "is_warmup": it <= warmup,
            "time_us": x.step_s * 1e6, "timers_us": x.timers_us, "timers_us_rank_mean": x.timers_us_rank_mean,
            "lm_loss": x.lm_loss, "tflops": megatron_tflops(cfg, x.step_s, world.world_size),
            "samples_per_second": p.global_batch / x.step_s,
            "tokens_per_gpu_per_second": p.global_batch * cfg.model.seq_len / x.step_s / world.world_size,
            **layout_fields(cfg, world)}


def print_iteration(row: dict[str, Any], x: Iteration, args: argparse.Namespace) -> None:
    """The row as Megatron-DeepSpeed's ``key=value`` line: one parser reads both."""
    it, gbs = row["iteration"], row["global_batch"]
    print(format_iteration_line(
        it, train_iters=args.steps, elapsed_ms=x.step_s * 1e3, global_batch_size=gbs,
        lm_loss=row["lm_loss"], samples_per_second=row["samples_per_second"],
        tokens_per_gpu_per_second=row["tokens_per_gpu_per_second"], tflops_lm=row["tflops"],
        consumed_samples=it * gbs, seq_len=row["seq_len"], learning_rate=args.lr,
        timestamp=True), flush=True)


# ---------------------------------------------------------------------------------------------
# The summary


@dataclass
class History:
    """Every iteration so far, in order (the summary is over those after the warm-up)."""

    step_times: list[float] = field(default_factory=list)
    timer_rows: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rank_timers: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: Iteration) -> None:
        self.step_times.append(x.step_s)
        self.timer_rows.append(x.timers_us)
        self.rank_timers.append(x.rank_timers_us)
        self.losses.append(x.lm_loss)


def summary_row(cfg: TrainConfig, world, step_times: list[float], timer_rows: list[dict[str, float]],
                losses: list[float], *, warmup: int, rank_timers: list | None = None) -> dict[str, Any]:
    """Median step time (and per-phase medians) over the iterations after the warm-up.

    ``timers_us`` takes each phase's max over ranks (Megatron's convention: the phases then
    over-count the step). ``timers_us_bottleneck`` are the phases of one rank — the one with
    the most forward + backward time, i.e. the slowest pipeline stage — which add up to about
    the step, so they can stand beside a predicted breakdown."""
    kept = [t * 1e6 for t in step_times[warmup:]]
    stats = summarize(kept)
    row = {"probe": PROBE, "case": "summary", "kind": "train_summary", "status": "ok",
           "iters": len(kept), "warmup": warmup, "statistic": "median", "time_us": stats["time_us_median"],
           **stats, "time_us_samples": [round(x, 3) for x in kept],
           "warmup_us_samples": [round(t * 1e6, 3) for t in step_times[:warmup]],
           "timers_us": {k: statistics.median(r[k] for r in timer_rows[warmup:]) for k in PHASES},
           "lm_loss": losses[-1], "lm_loss_per_iteration": losses,
           "tflops": megatron_tflops(cfg, stats["time_us_median"] / 1e6, world.world_size),
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


def close_run(writer: results.RunWriter, tr: Trainer, h: History, args: argparse.Namespace) -> None:
    """Rank 0: the summary row, the manifest closed ``ok``, and the human lines."""
    summary = summary_row(tr.cfg, tr.world, h.step_times, h.timer_rows, h.losses, warmup=args.warmup_steps,
                          rank_timers=h.rank_timers)
    writer.write_row(summary)
    writer.close(status="ok")
    if args.quiet:
        return
    print(f"# step time {summary['time_us_median'] / 1e3:.2f} ms median over {summary['iters']} "
          f"iterations (min {summary['time_us_min'] / 1e3:.2f}, max {summary['time_us_max'] / 1e3:.2f}, "
          f"stdev {summary['time_us_stdev'] / 1e3:.2f}); timers (ms) "
          + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in summary["timers_us"].items()))
    if summary.get("warning"):
        print(f"#   unstable: {summary['warning']}")
    print(f"# rows: {writer.dir / results.ROWS}", flush=True)


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, argv: Sequence[str], *, world: World, cfg: TrainConfig) -> int:
    """Every rank: build, ``--steps`` iterations (rank 0 writes a row and a line for each), the
    summary. An exception ends this rank with its case named (the rows so far are kept)."""
    tr = build(args, world, cfg)
    writer = open_run(args, argv, tr) if world.rank == 0 else None
    history = History()
    current = "setup"
    try:
        for it in range(1, args.steps + 1):
            current = f"iteration {it}"
            x = one_iteration(tr, args, it)
            history.add(x)
            if writer is not None:
                row = iteration_row(tr, x, it=it, warmup=args.warmup_steps)
                writer.write_row(row)
                if not args.quiet:
                    print_iteration(row, x, args)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as e:
        abort_rank(PROBE, world, writer, current, e, row={"probe": PROBE, "case": current, "kind": "train_step"})
    if writer is not None:
        close_run(writer, tr, history, args)
    dist.barrier(group=world.control)
    dist.destroy_process_group()
    return 0
