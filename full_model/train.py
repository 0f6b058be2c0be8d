"""The reference 3D-parallel training step: measured step time to check the predictor against.

    mpiexec -n 4 python -m full_model.train --model tiny --tp 2 --pp 2 --steps 5
    python -m full_model.train --model tiny --dp 2 --steps 5          # embedded 2-rank world
    torchrun --nproc-per-node 12 -m full_model.train --model alcf-1t --scale 0.1 --layers 12 --tp 12

A GPT-style decoder (``full_model.reference.model``) whose layer is the workload's op list, TP/PP/DP
from ``full_model.reference.parallel``, the 1F1B schedule from ``full_model.reference.schedule``, AdamW, full
recompute optional; one run's steps in ``full_model.reference.step`` (this module is the door: the
command line, its checks before any rank starts, and the embedded world). Each iteration is logged in Megatron-DeepSpeed's ``key=value`` line (one
parser reads both) and written as a result row with per-phase timers (forward, backward,
p2p_wait, dp_sync, optimizer: max over ranks, as Megatron's timers report); the last row is a
summary: median step time over the iterations after ``--warmup-steps``, with its spread.

What bounds it: on CPU/gloo at tiny sizes, the GEMMs and the framework's per-op overhead; at
real sizes, whatever the predictor says — that is the point of running it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Sequence

from full_model.reference import PROBE
from microbench.harness.cli import ArgumentParser
from microbench.harness.lifecycle import RUN, install_signal_handlers, usage_exit
from microbench.harness.modelargs import DIM_FLAGS, add_model_args, config_from_args, preset_config
from microbench.harness.options import MAX_TIMEOUT_S, check_out, check_thread_env
from microbench.model.config import ModelConfig, TrainConfig
from microbench.runtime import results
from microbench.runtime.errors import UsageError
from microbench.runtime.launch import EMBEDDED_ENV, agreed_launch, launched_rank
from microbench.runtime.spawn import spawn_local_world
from microbench.runtime.world import BACKENDS, DEVICES, init_world

TRAIN_MODEL_FLAGS = ("model", *DIM_FLAGS, "dtype", "tp", "pp", "dp", "mbs", "gbs", "recompute",
                     "sequence-parallel", "zero")


# ---------------------------------------------------------------------------------------------
# Configuration


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=f"python -m {PROBE}", description=__doc__.splitlines()[0])
    add_model_args(ap, flags=TRAIN_MODEL_FLAGS, layout="world", model="tiny",
                   choices={"recompute": ("none", "full"), "zero": (0, 1)},
                   defaults={"recompute": "none", "sequence-parallel": False, "zero": 0})
    ap.add_argument("--scale", type=float, default=None,
                    help="width factor F: heads (hence hidden, head dim kept), kv heads and FFN × F, "
                         "rounded to multiples of tp; layers/seq/vocab unchanged (use --layers, --seq)")
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


def train_config(a: argparse.Namespace, *, world_size: int | None) -> TrainConfig:
    """The shared model and layout flags (``microbench.harness.modelargs``), then what the
    reference step adds: ``--scale`` (applied to the preset before the flags), ``--steps`` and
    ``--warmup-steps``, and sequence parallelism sharding the sequence itself."""
    if a.steps < 1:
        raise UsageError(f"--steps {a.steps}: must be a positive integer")
    if a.warmup_steps < 0 or a.warmup_steps >= a.steps:
        raise UsageError(f"--warmup-steps {a.warmup_steps}: must be ≥ 0 and < --steps ({a.steps})")
    base = None
    if a.scale is not None:
        base = preset_config(a)
        base = dataclasses.replace(base, model=scaled(base.model, a.scale, a.tp or 1))
    cfg = config_from_args(a, layout="world", world_size=world_size, base=base)
    # this step's gradients live in flat buffers, reduced in place (full_model.reference.parallel)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, grad_sync="flat"))
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and cfg.model.seq_len % tp:
        raise UsageError(f"--sequence-parallel shards the sequence: seq_len({cfg.model.seq_len}) % tp({tp}) ≠ 0")
    return cfg


# ---------------------------------------------------------------------------------------------
# The run


def train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """One rank: its world, the configuration checked against it, then the step's loop
    (:func:`full_model.reference.step.run`)."""
    from full_model.reference.step import run
    world = init_world(device=args.device, backend=args.backend, timeout_s=args.timeout_s)
    RUN.rank, RUN.world_size, RUN.store = world.rank, world.world_size, world.store
    return run(args, argv, world=world, cfg=train_config(args, world_size=world.world_size))


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
    check_thread_env(os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    RUN.module, RUN.rank = PROBE, launched_rank()
    RUN.announce = RUN.rank == 0 and not os.environ.get(EMBEDDED_ENV)
    install_signal_handlers()
    args = build_parser().parse_args(argv)
    try:
        validate_numbers(args)
        cfg = train_config(args, world_size=None)
        info = agreed_launch(timeout_s=args.timeout_s)
        ranks = args.ranks or cfg.parallel.world_size
        world_size = (ranks if ranks > 1 else 1) if info is None else info.world_size
        if world_size is not None:
            train_config(args, world_size=world_size)  # the layout against the world
        if args.out is not None:
            check_out(args.out)
        elif info is None and ranks > 1:  # the parent names the run directory, so it can close it
            args.out = str(results.default_out_dir(PROBE))
            argv = [*argv, "--out", args.out]
    except UsageError as e:
        return usage_exit(e)
    if info is None and ranks > 1:
        # No launcher: become the parent of an embedded local world.
        return spawn_local_world(PROBE, argv, nprocs=ranks, timeout_s=args.timeout_s, run_dir=args.out)
    try:
        return train(args, argv)
    except UsageError as e:
        return usage_exit(str(e), after_init=True)


if __name__ == "__main__":
    sys.exit(main())
