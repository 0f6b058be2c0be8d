"""Benchmark (not a test): Megatron-DeepSpeed's own host time per layer per micro-batch on this machine.

    python -m benchmarks.megatron_host [--source DIR] [--reps 9] [--out DIR]

The framework runs narrowed until its operations are negligible (hidden and sequence
``HOST_WIDTH``, the gpt3-175b layer otherwise: full recompute, unfused attention, fp32,
RMSNorm; TP 1, PP 1, DP 1, 8 micro-batches of 1) at 2 and at 10 layers, alternating, ``--reps``
times. The step's median after the warm-up, per layer count; the host time per layer per
micro-batch is the slope ``(median(L10) − median(L2)) / 8 layers / 8 micro-batches`` — what
a layer adds, the step's fixed costs (embedding, head, optimizer call, data) cancelled. The
95 % interval is a bootstrap over the runs (seed 0). The phases (fwd, recompute, bwd) share it
by the ratio the host probe measured (``analysis.calibrate.HOST_PHASE_RATIO``).

On a CPU the narrowed layer still does its (small) arithmetic, so the figure is an upper bound
on the host's time; the A100 files' ``host:`` values come from this measurement (their
provenance says so). Writes ``DIR/host.json`` (every run's step time, the slope, its
interval, the phases) and prints it. ~15 s a run on 2 cores.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from analysis.calibrate import HOST_PHASE_RATIO
from microbench.harness.cli import ArgumentParser, user_path
from microbench.model.config import HOST_WIDTH, preset, with_layout

LAYERS = (2, 10)
MICROBATCHES = 8
ITERS = 8
WARMUP = 2


def narrowed_175b(layers: int):
    return with_layout(preset("gpt3-175b"), num_layers=layers, **HOST_WIDTH, num_kv_heads=4, vocab_size=256,
                       tp=1, pp=1, dp=1, micro_batch=1, global_batch=MICROBATCHES, recompute="full",
                       dtype="fp32", norm="rmsnorm", dropout=True, tied_embeddings=False)


def slope_ms(runs: dict[int, list[float]]) -> float:
    lo, hi = LAYERS
    return (statistics.median(runs[hi]) - statistics.median(runs[lo])) / (hi - lo) / MICROBATCHES


def bootstrap(runs: dict[int, list[float]], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(runs[k]) for k in LAYERS)
    s = [(np.median(rng.choice(hi, hi.size)) - np.median(rng.choice(lo, lo.size))) / (LAYERS[1] - LAYERS[0])
         / MICROBATCHES for _ in range(n)]
    return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


def record(runs: dict[int, list[float]]) -> dict:
    """The measurement as the YAML's provenance cites it: runs, slope, interval, phases (µs)."""
    per = slope_ms(runs)
    lo, hi = bootstrap(runs)
    share = 1.0 + sum(HOST_PHASE_RATIO.values())
    fwd = per * 1e3 / share
    return {"step_ms": {str(k): v for k, v in runs.items()}, "per_layer_microbatch_ms": per,
            "ci95_ms": [lo, hi], "phases_us": {"fwd": fwd, **{k: fwd * r for k, r in HOST_PHASE_RATIO.items()}},
            "phase_ratio": HOST_PHASE_RATIO, "layers": list(LAYERS), "microbatches": MICROBATCHES,
            "iters": ITERS, "warmup": WARMUP}


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.megatron_host", description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=None, help="Megatron-DeepSpeed checkout (default: the vendored one)")
    ap.add_argument("--reps", type=int, default=9, help="runs per layer count (default %(default)s)")
    ap.add_argument("--out", default="results/megatron-host", help="run directory (default %(default)s)")
    a = ap.parse_args(argv)
    if a.reps < 2:
        ap.error(f"--reps {a.reps}: need at least 2 runs per layer count for an interval")
    import pandas as pd

    from full_model.megatron.run import RunOptions, run
    from full_model.megatron.setup import SetupError, resolve_source
    out = user_path(a.out)
    try:
        src = resolve_source(a.source)
    except SetupError as e:
        print(f"error: benchmarks.megatron_host: {e}", file=sys.stderr)
        return 2
    runs: dict[int, list[float]] = {k: [] for k in LAYERS}
    for rep in range(a.reps):
        for layers in LAYERS:
            d = out / f"L{layers}-r{rep}"
            t0 = time.monotonic()
            chk = run(narrowed_175b(layers), RunOptions(source=src, out=d, train_iters=ITERS, timeout_s=900))
            if chk.status != "ok":
                print(f"error: benchmarks.megatron_host: run {d} {chk.status}: {'; '.join(chk.reasons)}",
                      file=sys.stderr)
                return 1
            it = pd.read_csv(d / "iterations.csv")
            runs[layers].append(float(it[it["iteration"] > WARMUP]["elapsed_ms"].median()))
            print(f"# L{layers} run {rep}: {runs[layers][-1]:.1f} ms a step ({time.monotonic() - t0:.0f} s)",
                  flush=True)
    rec = record(runs)
    (out / "host.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
