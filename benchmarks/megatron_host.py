"""Benchmark (not a test): Megatron-DeepSpeed's own host time per layer per micro-batch on this machine.

    python -m benchmarks.megatron_host [--source DIR] [--reps 9] [--out DIR] [--tp 1 2]

The framework runs narrowed until its operations are negligible (hidden and sequence
``HOST_WIDTH``, the gpt3-175b layer otherwise: full recompute, unfused attention, fp32,
RMSNorm; TP 1, PP 1, DP 1, 8 micro-batches of 1) at 2 and at 10 layers, alternating, ``--reps``
times. The step's median after the warm-up, per layer count; the host time per layer per
micro-batch is the slope ``(median(L10) − median(L2)) / 8 layers / 8 micro-batches`` — what
a layer adds, the step's fixed costs (embedding, head, optimizer call, data) cancelled. The
95 % interval is a bootstrap over the runs (seed 0). The phases (fwd, recompute, bwd) share it
by the ratio the host probe measured (``analysis.calibrate.HOST_PHASE_RATIO``).

``--tp 1 2``: the same at TP 1 and TP 2 (2 ranks), all runs interleaved, and what TP adds to
the host per tensor-parallel collective call: ``(slope(TP 2) − slope(TP 1)) / calls − allreduce``,
where ``calls`` is the workload's TP collectives per layer per micro-batch (6 with full
recompute) and ``allreduce`` the allreduce probe's median at exactly the run's narrowed
activation ([1·64, 64] fp32 on 2 ranks, measured once per repetition between the runs): on a
CPU gloo's allreduce is synchronous, so its transfer is taken away and what stays is the
framework's Python and the c10d call path (Megatron's TP autograd functions, the collective's
dispatch). On this CPU gloo's in-step reduction fills that remainder (docs/decisions-issue19.md),
so it bounds the A100 files' ``host.tp_call_us`` from above and does not set it.

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
from microbench.model.workload import workload

LAYERS = (2, 10)
MICROBATCHES = 8
ITERS = 8
WARMUP = 2


def narrowed_175b(layers: int, tp: int = 1):
    return with_layout(preset("gpt3-175b"), num_layers=layers, **HOST_WIDTH, num_kv_heads=4, vocab_size=256,
                       tp=tp, pp=1, dp=1, micro_batch=1, global_batch=MICROBATCHES, recompute="full",
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


def tp_calls(tp: int) -> int:
    """The workload's TP collective calls per layer per micro-batch of the narrowed run."""
    from microbench.model.workload import workload
    return sum(c.count for c in workload(narrowed_175b(LAYERS[0], tp)).collectives if c.axis == "tp")


def tp_call_record(runs: dict[int, dict[int, list[float]]], allreduce_us: list[float], tp: int,
                   n: int = 10_000, seed: int = 0) -> dict:
    """What TP adds to the host per collective call, µs: the slope's growth from TP 1 to ``tp``
    per call, less the allreduce's own (synchronous) time; a bootstrap over every run."""
    calls = tp_calls(tp)

    def per_call(one: dict[int, list[float]], base: dict[int, list[float]], ar: list[float]) -> float:
        return (slope_ms(one) - slope_ms(base)) * 1e3 / calls - statistics.median(ar)

    rng = np.random.default_rng(seed)
    draw = lambda xs: list(rng.choice(np.asarray(xs), len(xs)))  # noqa: E731
    boot = [per_call({k: draw(v) for k, v in runs[tp].items()}, {k: draw(v) for k, v in runs[1].items()},
                     draw(allreduce_us)) for _ in range(n)]
    return {"tp": tp, "calls_per_layer_microbatch": calls, "allreduce_us": allreduce_us,
            "allreduce_median_us": statistics.median(allreduce_us),
            "tp_call_us": per_call(runs[tp], runs[1], allreduce_us),
            "ci95_us": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def allreduce_us(cfg, out, timeout: float) -> float:
    """The allreduce probe's median at exactly the narrowed run's TP activation, on its ranks,
    in place (as Megatron reduces it)."""
    import subprocess

    from analysis.load import load
    m, p = cfg.model, cfg.parallel
    cmd = [sys.executable, "-m", "microbench.allreduce", "--model", "gpt3-175b", "--layers", str(m.num_layers),
           "--hidden", str(m.hidden), "--heads", str(m.num_heads), "--kv-heads", str(m.num_kv_heads),
           "--ffn", str(m.ffn_hidden), "--seq", str(m.seq_len), "--vocab", str(m.vocab_size), "--tp", str(p.tp),
           "--mbs", str(p.micro_batch), "-d", m.dtype, "--ranks", str(p.tp), "-n", "200", "-w", "20",
           "--place", "in", "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    df = load(out)
    tp_ar = next(c for c in workload(cfg).collectives if c.axis == "tp")  # the workload's TP activation
    row = df[(df["status"] == "ok") & (df["size_bytes"] == tp_ar.bytes)]
    if len(row) != 1:
        raise RuntimeError(f"{out}: expected one ok allreduce row at the narrowed activation, found {len(row)}")
    return float(row["time_us_median"].iloc[0])


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.megatron_host", description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=None, help="Megatron-DeepSpeed checkout (default: the vendored one)")
    ap.add_argument("--reps", type=int, default=9, help="runs per layer count (default %(default)s)")
    ap.add_argument("--out", default="results/megatron-host", help="run directory (default %(default)s)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1], choices=(1, 2),
                    help="tensor-parallel sizes, runs interleaved (default 1; '1 2' also gives the per-call term)")
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
    tps = sorted(set(a.tp))
    if tps != [1] and 1 not in tps:
        ap.error(f"--tp {' '.join(map(str, a.tp))}: the per-call term needs TP 1 beside it")
    runs: dict[int, dict[int, list[float]]] = {tp: {k: [] for k in LAYERS} for tp in tps}
    ar: list[float] = []
    for rep in range(a.reps):
        for tp in tps:
            for layers in LAYERS:
                d = out / (f"L{layers}-r{rep}" if tp == 1 else f"tp{tp}-L{layers}-r{rep}")
                t0 = time.monotonic()
                chk = run(narrowed_175b(layers, tp), RunOptions(source=src, out=d, train_iters=ITERS, timeout_s=900))
                if chk.status != "ok":
                    print(f"error: benchmarks.megatron_host: run {d} {chk.status}: {'; '.join(chk.reasons)}",
                          file=sys.stderr)
                    return 1
                it = pd.read_csv(d / "iterations.csv")
                runs[tp][layers].append(float(it[it["iteration"] > WARMUP]["elapsed_ms"].median()))
                print(f"# TP {tp} L{layers} run {rep}: {runs[tp][layers][-1]:.1f} ms a step "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
            if tp > 1:
                ar.append(allreduce_us(narrowed_175b(LAYERS[0], tp), out / f"allreduce-tp{tp}-r{rep}", timeout=600))
                print(f"# TP {tp} allreduce at the narrowed activation: {ar[-1]:.1f} us", flush=True)
    rec = record(runs[1]) if 1 in runs else {}
    rec.update({f"tp{tp}": record(runs[tp]) for tp in tps if tp > 1})
    rec.update({f"tp{tp}_call": tp_call_record(runs, ar, tp) for tp in tps if tp > 1})
    (out / "host.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
