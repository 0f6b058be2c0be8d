"""Benchmark (not a test): does the harness cost anything? The allreduce probe's time
against a bare ``dist.all_reduce`` loop timed with the same Timer, as a ratio, in one run.

    python -m benchmarks.allreduce_overhead [--ranks 2] [-b 1K -e 16M -f 16] [-n 50]

Both sides run on the same ranks, on the same buffers, back to back per size. The probe side
is :func:`microbench.harness.engine.measure_case` (barrier per iteration outside the timed region,
per-iteration max over ranks, median); the bare side times n back-to-back calls and divides.
A ratio near 1 says the probe reports what the collective costs; above 1 it includes the
per-iteration synchronisation a bare loop lets the collectives pipeline away.
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from microbench.harness.cli import ArgumentParser
from microbench.allreduce import AllReduce
from microbench.harness.contract import Context
from microbench.harness.engine import measure_case
from microbench.harness.options import make_grid, parse_size
from microbench.harness.timing import Timer
from microbench.runtime.launch import detect_launcher
from microbench.runtime.world import init_world
from microbench.runtime.spawn import spawn_local_world


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m benchmarks.allreduce_overhead")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("-b", default="1K")
    p.add_argument("-e", default="16M")
    p.add_argument("-f", type=float, default=16)
    p.add_argument("-n", type=int, default=50)
    p.add_argument("-w", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="alternate probe/bare this many times")
    args = p.parse_args(argv)
    if detect_launcher() is None:
        return spawn_local_world("benchmarks.allreduce_overhead", argv, nprocs=args.ranks, timeout_s=120)
    import torch.distributed as dist
    world = init_world(timeout_s=120)
    probe = AllReduce()
    ns = argparse.Namespace(iters=args.n, warmup=args.w, statistic="median", check=0, dtype="fp32",
                            minbytes_i=parse_size(args.b), maxbytes_i=parse_size(args.e),
                            stepfactor=args.f, axis="world", groups="all", place="in", model=None)
    ctx = Context(args=ns, world=world, cfg=None, grid=make_grid(
        argparse.Namespace(tp=None, pp=None, dp=None), world.world_size))
    timer = Timer(world)
    out = []
    for case in probe.cases(ctx):
        probe_us, probe_mean_us, bare_us = [], [], []
        for _ in range(args.repeats):
            row = measure_case(probe, ctx, case, timer)
            probe_us.append(row["time_us"])
            probe_mean_us.append(row["time_us_mean"])
            state = probe.setup(ctx, case, seed=1)
            for _ in range(args.w):
                probe.run(ctx, case, state)
            dist.barrier(group=world.control)
            t = timer.time(lambda: [probe.run(ctx, case, state) for _ in range(args.n)])
            bare_us.append(t / args.n * 1e6)
        pm, bm = statistics.median(probe_us), statistics.median(bare_us)
        pmean = statistics.median(probe_mean_us)
        out.append({"size_bytes": case.fields["size_bytes"], "probe_median_us": pm,
                    "probe_mean_us": pmean, "bare_us": bm, "ratio_median": pm / bm,
                    "ratio_mean": pmean / bm})
    if world.rank == 0:
        print(f"# allreduce probe vs bare dist.all_reduce loop: world {world.world_size}, "
              f"{world.backend}/{world.device_kind}, n={args.n}, median of {args.repeats} repeats")
        print(f"#{'size':>11} {'probe med(us)':>13} {'probe mean(us)':>14} {'bare(us)':>10} "
              f"{'med/bare':>8} {'mean/bare':>9}")
        for r in out:
            print(f"{r['size_bytes']:>12d} {r['probe_median_us']:>13.1f} {r['probe_mean_us']:>14.1f} "
                  f"{r['bare_us']:>10.1f} {r['ratio_median']:>8.3f} {r['ratio_mean']:>9.3f}")
        print(json.dumps({"benchmark": "allreduce_overhead", "world_size": world.world_size,
                          "backend": world.backend, "device": world.device_kind, "rows": out}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
