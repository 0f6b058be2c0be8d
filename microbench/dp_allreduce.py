"""DP gradient sync probe: the data-parallel reduction of one optimizer step, bucketed, on
every DP group of the grid at once.

    mpiexec -n 4 python -m microbench.dp_allreduce --model alcf-1t --tp 2 --dp 2 --max-bytes 256M
    mpiexec -n 4 python -m microbench.dp_allreduce --model llama2-7b --dp 4 --zero 0 --bucket-mb 64

The rank's gradients are the workload's (its largest stage's parameters in the config's
grad dtype: fp32 accumulation for the 1T run), cut into buckets of ``--bucket-mb`` MiB
(default 3e7 elements, DeepSpeed's reduce bucket). ``--zero 0`` (every probe's layout flag;
default the preset's) allreduces each bucket; ``--zero 1`` and ``2`` reduce the gradient
buckets as the workload's ``grad_sync`` says (DeepSpeed: an allreduce of each bucket; flat
buffers: a reduce-scatter) and then allgather the updated (model-dtype) parameters (one
reduction: the step's count of them is the workload's). One row per bucket collective, one row timing the measured
buckets back to back, and a derived ``dp_sync_step`` row: that time × the extrapolation
factor (all buckets / measured buckets, by bytes) when ``--max-bytes`` keeps fewer buckets
in memory than the step has. Bounded by the DP groups' links (inter-node on a real layout).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Iterable

from microbench.allgather import AllGather
from microbench.allreduce import AllReduce
from microbench.harness.collective import dp_bucket_elements, dp_collectives
from microbench.model.metrics import bus_factor
from microbench.model.config import dtype_bytes
from microbench.harness.contract import Case, Context, Probe
from microbench.harness.engine import main_for
from microbench.harness.options import parse_size
from microbench.reduce_scatter import ReduceScatter
from microbench.runtime.errors import UsageError

SUBS = {"allreduce": AllReduce(), "reduce_scatter": ReduceScatter(), "allgather": AllGather()}


class DpAllreduce(Probe):
    name = "dp_allreduce"
    module = "microbench.dp_allreduce"
    description = __doc__.splitlines()[0]
    footer_metric = "busbw_gbps"
    default_iters = 10
    default_warmup = 2
    columns = (("size", "size_bytes", ">14d"), ("type", "dtype", ">5"), ("op", "op", ">17"),
               ("buckets", "num_buckets", ">7d"), ("n", "group_size", ">3d"), ("groups", "num_groups", ">6d"),
               ("time(us)", "time_us", ">12.1f"), ("algbw(GB/s)", "algbw_gbps", ">11.3f"),
               ("busbw(GB/s)", "busbw_gbps", ">11.3f"), ("#wrong", "num_wrong", ">6d"))

    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--bucket-mb", type=float, default=None,
                       help="bucket size in MiB of gradient (default: 3e7 elements, DeepSpeed's)")
        p.add_argument("--max-bytes", default=None,
                       help="most bucket bytes a rank may hold (K/M/G); fewer buckets are timed "
                            "and the step is extrapolated (default: all buckets)")
        p.add_argument("--groups", default="all", choices=("all", "one"),
                       help="all DP groups at once (as in a step), or one with the rest idle")
        p.add_argument("--grad-tp", type=int, default=None,
                       help="size the gradient as the shard of this TP (e.g. the target's), "
                            "while the sync runs on this world's DP groups")
        p.add_argument("--grad-pp", type=int, default=None, help="likewise for PP")

    def validate(self, args: argparse.Namespace) -> None:
        if args.model is None:
            raise UsageError("dp_allreduce sizes the sync from the workload: give --model (and --tp/--pp/--dp)")
        if args.bucket_mb is not None and not args.bucket_mb > 0:
            raise UsageError(f"--bucket-mb {args.bucket_mb}: must be > 0")
        args.max_bytes_i = parse_size(args.max_bytes) if args.max_bytes is not None else None
        if args.dp == 1:
            raise UsageError("--dp 1: no DP gradient sync to measure (give --dp ≥ 2)")
        for flag in ("grad_tp", "grad_pp"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {v}: must be a positive integer")

    def plan(self, ctx: Context) -> dict[str, Any]:
        """Bucket size, bucket counts and the extrapolation, from the workload (same on all ranks)."""
        args = ctx.args
        w = dp_collectives(ctx, zero=args.zero)
        grad = w.dp[0]  # the gradient collective (allreduce or reduce-scatter) sets the buckets
        n = grad.group_size
        bucket = dp_bucket_elements(ctx, args.bucket_mb, grad.dtype)
        bucket = min(max(bucket // n, 1) * n, math.ceil(grad.elements / n) * n)
        per_bucket = sum(bucket * dtype_bytes(c.dtype) for c in w.dp)
        total = math.ceil(grad.elements / bucket)
        measured = total
        if args.max_bytes_i is not None and total * per_bucket > args.max_bytes_i:
            measured = args.max_bytes_i // per_bucket
            if measured < 1:
                raise UsageError(f"--max-bytes {args.max_bytes}: smaller than one bucket "
                                 f"({per_bucket} bytes over {len(w.dp)} buffer(s)); lower --bucket-mb")
        return {"ops": w.dp, "bucket": bucket, "total": total, "measured": measured,
                "factor": grad.elements / (measured * bucket), "grad_bytes": w.dp_grad_bytes,
                "bucket_bytes": bucket * dtype_bytes(grad.dtype)}

    def cases(self, ctx: Context) -> Iterable[Case]:
        groups, mine, _ = ctx.world.groups_for(ctx.grid, "dp")
        active = groups if ctx.args.groups == "all" else groups[:1]
        plan = ctx.extra["plan"] = self.plan(ctx)
        place = ctx.placement("dp", mine, len(active))
        b = plan["bucket"]
        subs = [{"kind": c.kind, "count": b, "dtype": c.dtype, "in_place": True, "group_size": len(mine)}
                for c in plan["ops"]]
        m = plan["measured"]
        ctx.extra["parts"] = {f"{c.name}-bucket": ([s], 1) for c, s in zip(plan["ops"], subs)}
        ctx.extra["parts"]["dp_sync_measured"] = (subs, m)
        for c, sub in zip(plan["ops"], subs):
            yield Case(f"{c.name}-bucket", {**sub, "op": c.name, "size_bytes": b * dtype_bytes(c.dtype),
                                            "num_buckets": 1, "bus_bytes": self.bus_bytes([sub], 1), **place},
                       group_ranks=mine, active=mine in active)
        yield Case("dp_sync_measured", {
            "kind": "+".join(s["kind"] for s in subs), "op": "dp_sync_measured", "count": b * m,
            "dtype": "+".join(dict.fromkeys(s["dtype"] for s in subs)), "num_buckets": m,
            "size_bytes": sum(b * m * dtype_bytes(s["dtype"]) for s in subs),
            "bus_bytes": self.bus_bytes(subs, m), **place}, group_ranks=mine, active=mine in active)

    @staticmethod
    def bus_bytes(subs: list[dict], buckets: int) -> float:
        """Bytes each rank's links carry: Σ S·factor (nccl-tests), comparable across modes."""
        return sum(s["count"] * buckets * dtype_bytes(s["dtype"]) * (bus_factor(s["kind"], s["group_size"]) or 0)
                   for s in subs)

    def setup(self, ctx: Context, case: Case, *, seed: int) -> Any:
        subs, buckets = ctx.extra["parts"][case.name]
        parts = []
        for sub in subs:  # bucket after bucket, as the framework issues them
            for _ in range(buckets):
                probe, sc = SUBS[sub["kind"]], Case(case.name, sub, group_ranks=case.group_ranks)
                parts.append((probe, sc, probe.setup(ctx, sc, seed=seed)))
        return parts

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        for probe, sc, st in state:
            probe.call(ctx, sc, st)

    def result(self, ctx: Context, case: Case, state: Any) -> list:
        return [t for probe, sc, st in state for t in probe.result(ctx, sc, st)]

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        totals = [probe.check(ctx, sc, st) for probe, sc, st in state]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        if time_s <= 0:
            return {}
        return {"algbw_gbps": case.fields["size_bytes"] / time_s / 1e9,
                "busbw_gbps": case.fields["bus_bytes"] / time_s / 1e9 or None}

    def finish(self, ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        plan = ctx.extra["plan"]
        row = next((r for r in rows if r.get("op") == "dp_sync_measured"), None)
        keep = ("kind", "dtype", "axis", "group_size", "num_groups", "ranks_per_node", "crosses_nodes",
                "world_size", "device", "backend", "statistic")
        out = {k: row[k] for k in keep if k in row} if row else {}
        out.update(case="dp_sync_step", op="dp_sync_step", num_buckets=plan["total"])
        if row is None or row.get("status") != "ok":
            return [{**out, "status": "skipped", "reason": "the measured buckets did not run"}]
        f = plan["factor"]
        t = row["time_us"] * f
        extra = {"num_buckets_total": plan["total"], "num_buckets_measured": plan["measured"],
                 "extrapolation_factor": f, "bucket_bytes": plan["bucket_bytes"],
                 "grad_bytes_per_rank": plan["grad_bytes"]}
        how = (f"{plan['measured']} of {plan['total']} buckets measured, × {f:.4g}" if f != 1
               else f"all {plan['total']} bucket(s) measured, no extrapolation")
        return [{**out, "size_bytes": round(row["size_bytes"] * f), "bus_bytes": row["bus_bytes"] * f,
                 "time_us": t, "time_us_measured": row["time_us"], "extrapolated": f != 1,
                 "algbw_gbps": row.get("algbw_gbps"), "busbw_gbps": row.get("busbw_gbps"),
                 "num_wrong": row.get("num_wrong"), "extra": extra,
                 "note": f"whole-step DP sync {t / 1e6:.6g} s per rank ({how}; "
                         f"{plan['grad_bytes']} gradient bytes per rank)"}]


if __name__ == "__main__":
    main_for(DpAllreduce())
