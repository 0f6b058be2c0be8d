"""Overlap probe: how much of a collective stays exposed when it runs beside the GEMMs
the framework hides it behind (by default the DP gradient bucket during a layer's
backward FC GEMMs; DeepSpeed overlaps exactly this).

    mpiexec -n 4 python -m microbench.overlap --model tiny --tp 2 --dp 2
    mpiexec -n 2 python -m microbench.overlap --model llama2-7b --dp 2 --collective dp_allreduce

Three cases, each timed by the harness on every rank: the GEMMs alone, the collective
alone (every group of its axis at once), and both — the collective issued asynchronously
(``async_op=True``: NCCL/CCL on their own stream, gloo on its own thread), the GEMMs run
on the calling thread, then wait. The summary row's exposed fraction is
(t_both − t_gemm) / t_coll: 0 = fully hidden, 1 = fully exposed (the benchmark's
"DP communication can be neglected" is the claim that it is 0). Noise can push it
slightly outside [0, 1]; it is recorded as measured, with its three components.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

from microbench.allreduce import AllReduce
from microbench.harness.collective import dp_bucket_elements, dp_collectives, tp_activation_elements
from microbench.harness.compute import check_scale, scale_dim
from microbench.model.config import dtype_bytes, with_layout
from microbench.harness.contract import Case, Context, Probe, Skip
from microbench.harness.engine import main_for
from microbench.harness.options import torch_dtype
from microbench.runtime.errors import UsageError
from microbench.model.workload import workload

VARIANTS = ("gemm_alone", "collective_alone", "both")
DEFAULT_GEMMS = "fc2.dgrad,fc2.wgrad,fc1.dgrad,fc1.wgrad"  # a layer's backward MLP, in order


class Overlap(Probe):
    name = "overlap"
    module = "microbench.overlap"
    description = __doc__.splitlines()[0]
    default_iters = 10
    default_warmup = 3
    columns = (("variant", "variant", ">16"), ("coll", "collective_name", ">12"),
               ("size", "size_bytes", ">11d"), ("axis", "axis", ">4"), ("n", "group_size", ">3d"),
               ("groups", "num_groups", ">6d"), ("gemm GFLOP", "gemm_gflop", ">10.2f"),
               ("time(us)", "time_us", ">11.1f"), ("exposed", "exposed_fraction", ">7.3f"),
               ("#wrong", "num_wrong", ">6d"))

    def add_args(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--collective", default="dp_allreduce", choices=("dp_allreduce", "tp_allreduce"),
                       help="one DP gradient bucket, or a layer's TP allreduce of [mbs·s, d]")
        p.add_argument("--gemms", default=DEFAULT_GEMMS,
                       help=f"workload GEMMs as name.phase, comma-separated (default {DEFAULT_GEMMS})")
        p.add_argument("--bucket-mb", type=float, default=None,
                       help="DP bucket in MiB (default: 3e7 elements, DeepSpeed's)")
        p.add_argument("--gemm-tp", type=int, default=None,
                       help="take the GEMMs of this TP shard (e.g. the target's 12) while the "
                            "collective runs on this world's groups (default: the world's --tp)")
        p.add_argument("--scale", type=float, default=1.0,
                       help="shrink the GEMM dimensions by F (0 < F ≤ 1), as the compute probes do")

    def validate(self, args: argparse.Namespace) -> None:
        if args.model is None:
            raise UsageError("overlap takes its GEMMs and collective from the workload: give --model")
        if args.collective == "dp_allreduce" and args.dp == 1:
            raise UsageError("--collective dp_allreduce with --dp 1: no DP sync (give --dp ≥ 2)")
        check_scale(args.scale)
        if args.gemm_tp is not None and args.gemm_tp < 1:
            raise UsageError(f"--gemm-tp {args.gemm_tp}: must be a positive integer")
        if args.bucket_mb is not None and not args.bucket_mb > 0:
            raise UsageError(f"--bucket-mb {args.bucket_mb}: must be > 0")
        names = [g for g in args.gemms.split(",") if g]
        bad = [g for g in names if "." not in g]
        if not names or bad:
            raise UsageError(f"--gemms {args.gemms!r}: give name.phase items such as fc1.wgrad")

    def cases(self, ctx: Context) -> Iterable[Case]:
        args = ctx.args
        gemm_cfg = ctx.cfg
        if args.gemm_tp is not None:
            try:
                gemm_cfg = with_layout(ctx.cfg, tp=args.gemm_tp, pp=1, dp=1)
            except ValueError as e:
                raise UsageError(f"--gemm-tp {args.gemm_tp}: {e}") from None
        w = workload(gemm_cfg)
        gemms = []
        for item in args.gemms.split(","):
            name, _, phase = item.partition(".")
            found = w.by_name(name, phase)
            if not found:
                known = sorted({f"{g.name}.{g.phase}" for g in w.gemms})
                raise UsageError(f"--gemms: no GEMM {item!r} in the workload; known: {', '.join(known)}")
            g = found[0]
            try:
                g = dataclasses.replace(g, m=scale_dim(g.m, args.scale, f"{item} m", multiple=8),
                                        n=scale_dim(g.n, args.scale, f"{item} n", multiple=8),
                                        k=scale_dim(g.k, args.scale, f"{item} k", multiple=8))
            except ValueError as e:
                raise UsageError(str(e)) from None
            gemms.append(g)
        if args.collective == "dp_allreduce":
            grad = dp_collectives(ctx, zero=0).dp[0]
            axis, op = "dp", grad.name
            count, dtype = min(grad.elements, dp_bucket_elements(ctx, args.bucket_mb, grad.dtype)), grad.dtype
        else:
            axis, dtype = "tp", ctx.cfg.model.dtype
            op, count = tp_activation_elements(ctx)
        groups, mine, _ = ctx.world.groups_for(ctx.grid, axis)
        ctx.extra["gemms"] = gemms
        coll = {"name": op, "bytes": count * dtype_bytes(dtype)}
        for variant in VARIANTS:
            yield Case(variant, {
                "kind": "overlap", "op": variant, "variant": variant, "collective_name": op,
                "count": count, "dtype": dtype, "in_place": True, "size_bytes": coll["bytes"],
                "gemm_gflop": sum(g.flop for g in gemms) / 1e9 if variant != "collective_alone" else 0.0,
                "gemm": [{"name": f"{g.name}.{g.phase}", "m": g.m, "n": g.n, "k": g.k} for g in gemms],
                "collective": coll, "scale": args.scale, "gemm_tp": args.gemm_tp or ctx.grid.tp,
                **ctx.placement(axis, mine, len(groups))}, group_ranks=mine)

    def setup(self, ctx: Context, case: Case, *, seed: int) -> Any:
        import torch
        if ctx.world.backend == "mpi4py":
            raise Skip("overlap runs the framework's collective; --backend mpi4py has no async path here")
        g = torch.Generator().manual_seed(seed + ctx.rank)
        mats = []
        if case.fields["variant"] != "collective_alone":
            for gm in ctx.extra["gemms"]:  # values in [0.5, 1.5): never zeros
                a, b = (torch.rand(shape, generator=g).add_(0.5).to(ctx.device, torch_dtype(gm.dtype))
                        for shape in ((gm.m, gm.k), (gm.k, gm.n)))
                mats.append((a, b, torch.empty(gm.m, gm.n, dtype=a.dtype, device=ctx.device)))
        coll = AllReduce().setup(ctx, case, seed=seed) if case.fields["variant"] != "gemm_alone" else None
        return {"mats": mats, "coll": coll}

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch
        import torch.distributed as dist
        c = state["coll"]
        work = dist.all_reduce(c["recv"], group=c["group"], async_op=True) if c else None
        for a, b, out in state["mats"]:
            torch.matmul(a, b, out=out)
        if work is not None:
            work.wait()

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        return AllReduce().check(ctx, case, state["coll"]) if state["coll"] else (0, 0)

    def result(self, ctx: Context, case: Case, state: Any) -> list:
        return [state["coll"]["recv"]] if state["coll"] else []

    def finish(self, ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t = {r["variant"]: r.get("time_us") for r in rows if r.get("status") == "ok"}
        base = {k: rows[0][k] for k in ("collective_name", "size_bytes", "dtype", "gemm", "collective",
                                        "axis", "group_size", "num_groups", "ranks_per_node",
                                        "crosses_nodes", "gemm_gflop") if rows and k in rows[0]}
        base.update(case="summary", kind="overlap", op="overlap", variant="summary")
        if any(t.get(v) is None for v in VARIANTS) or not t["collective_alone"] > 0:
            return [{**base, "status": "skipped", "reason": "a component case did not run"}]
        exposed = (t["both"] - t["gemm_alone"]) / t["collective_alone"]
        return [{**base, "time_us": t["both"], "exposed_fraction": exposed, "extra": {
            "time_us_gemm_alone": t["gemm_alone"], "time_us_coll_alone": t["collective_alone"],
            "time_us_both": t["both"], "exposed_fraction": exposed,
            "gemm": base.get("gemm"), "collective": base.get("collective")},
            "note": f"exposed fraction ({t['both']:.1f} − {t['gemm_alone']:.1f}) / "
                    f"{t['collective_alone']:.1f} us = {exposed:.3f} of the collective stays exposed"}]


if __name__ == "__main__":
    main_for(Overlap())
