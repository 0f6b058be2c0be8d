"""Projection across node counts and layout search, from one model and one system profile.

``python -m analysis.project --model alcf-1t --system aurora`` — step time, FOM, MFU and
time-to-train for N tokens from 64 nodes to the full machine, keeping tp × pp and the
micro-batches per pipeline and growing dp (weak scaling, as a larger allocation would run).

``python -m analysis.project --model alcf-1t --system aurora --search --nodes 64`` — every
valid layout (tp, pp, dp, micro-batch, interleave, recompute, sequence parallelism, ZeRO) at
that node count and the preset's global batch, ranked by predicted step time among those
that fit in device memory.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from typing import Iterator, Sequence

from microbench.harness.cli import ArgumentParser
from microbench.model.config import TrainConfig, with_layout

from analysis import formulas
from analysis.predict import Prediction, add_config_args, config_from_args, predict
from analysis.errors import AnalysisError
from analysis.measured import load_profile
from analysis.system import SystemProfile


def default_nodes(cfg: TrainConfig, profile: SystemProfile, *, start: int | None = None) -> list[int]:
    """Powers of two from the preset's node count to the machine (the spec's ``nodes``),
    plus the full machine. A spec of a node type (``nodes: null``) has no machine to grow
    to: the caller must name the node counts."""
    rpn = profile.ranks_per_node
    first = start or max(1, -(-cfg.parallel.world_size // rpn))
    if profile.nodes is None:
        raise AnalysisError(f"system {profile.name} states no machine size (nodes: null in its spec): "
                            f"give --nodes N [N …]")
    full = profile.nodes
    out, n = [], first
    while n < full:
        out.append(n)
        n *= 2
    return out + [full]


def project(cfg: TrainConfig, profile: SystemProfile, nodes: Sequence[int], *,
            tokens: float = 1e12) -> list[dict]:
    """One row per node count: dp = ranks / (tp·pp); ranks that do not fill whole model
    replicas are left idle (reported as ``idle_ranks``)."""
    p = cfg.parallel
    rows = []
    for n in nodes:
        ranks = n * profile.ranks_per_node
        dp = ranks // (p.tp * p.pp)
        if dp < 1:
            rows.append({"nodes": n, "error": f"{ranks} ranks < tp({p.tp}) × pp({p.pp})"})
            continue
        try:
            c = with_layout(cfg, dp=dp, ranks_per_node=profile.ranks_per_node)
            pr = predict(c, profile)
        except ValueError as e:
            rows.append({"nodes": n, "error": str(e)})
            continue
        rows.append({"nodes": n, "dp": dp, "idle_ranks": ranks - c.parallel.world_size,
                     "global_batch": c.parallel.global_batch, "step_time_s": pr.step_time_s,
                     "fom": pr.fom, "mfu": pr.mfu, "model_tflops_per_device": pr.model_tflops_per_device,
                     "tokens_per_s": pr.tokens_per_s, "fits_in_memory": pr.fits_in_memory,
                     "time_to_train_days": formulas.time_to_train_s(c, pr.step_time_s, tokens) / 86400})
    return rows


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def layouts(cfg: TrainConfig, *, world: int, ranks_per_node: int,
            micro_batches: Sequence[int] = (1, 2, 4), interleaves: Sequence[int] = (1, 2, 4),
            zero_stages: Sequence[int] = (0, 1, 2, 3)) -> Iterator[TrainConfig]:
    """Every valid layout of ``world`` ranks at the config's global batch (TP inside a node)."""
    m, gbs = cfg.model, cfg.parallel.global_batch
    for tp in _divisors(world, ranks_per_node):
        for pp in _divisors(world // tp, m.num_layers):
            dp = world // (tp * pp)
            for mbs, v, rc, sp, z in itertools.product(micro_batches, interleaves, ("none", "selective", "full"),
                                                       (False, True), zero_stages):
                if (v > 1 and pp == 1) or (sp and tp == 1) or (z > 0 and dp == 1):
                    continue
                try:
                    yield with_layout(cfg, tp=tp, pp=pp, dp=dp, micro_batch=mbs, global_batch=gbs,
                                      interleave=v, recompute=rc, sequence_parallel=sp, zero_stage=z,
                                      ranks_per_node=ranks_per_node)
                except ValueError:
                    continue


def search(cfg: TrainConfig, profile: SystemProfile, *, nodes: int, top: int = 10) -> tuple[list[Prediction], int]:
    """Layouts that fit, fastest first; also returns how many valid layouts were priced."""
    preds = [predict(c, profile) for c in layouts(cfg, world=nodes * profile.ranks_per_node,
                                                  ranks_per_node=profile.ranks_per_node)]
    fit = sorted((p for p in preds if p.fits_in_memory), key=lambda p: p.step_time_s)
    return fit[:top], len(preds)


def _layout_str(c: TrainConfig) -> str:
    p = c.parallel
    return (f"tp{p.tp} pp{p.pp} dp{p.dp} mbs{p.micro_batch} v{p.interleave} rc={p.recompute} "
            f"sp={int(p.sequence_parallel)} zero{p.zero_stage}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.project", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--nodes", type=int, nargs="+", help="node counts (default: powers of two to the machine)")
    ap.add_argument("--tokens", type=float, default=1e12, help="tokens for time-to-train (default 1e12)")
    ap.add_argument("--search", action="store_true", help="rank layouts at --nodes (one count)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
        profile = load_profile(system=a.system, profile_dirs=a.profile, include_failed=a.include_failed,
                               allow_incomplete=a.allow_incomplete)
        bad = [n for n in a.nodes or [] if n < 1]
        if bad:
            raise ValueError(f"--nodes {bad[0]}: node counts must be ≥ 1")
        if a.search:
            if not a.nodes or len(a.nodes) != 1 or a.nodes[0] < 1:
                raise ValueError(f"--search needs one positive --nodes count, got {a.nodes}")
            best, n = search(cfg, profile, nodes=a.nodes[0], top=a.top)
            if a.json:
                print(json.dumps({"nodes": a.nodes[0], "num_layouts": n,
                                  "ranked": [{"layout": dataclasses.asdict(p.config.parallel),
                                              "step_time_s": p.step_time_s, "fom": p.fom, "mfu": p.mfu,
                                              "memory_gib": p.memory_gib_per_device["total"]} for p in best]}))
                return 0
            print(f"{cfg.model.name} on {profile.name}, {a.nodes[0]} nodes, global batch "
                  f"{cfg.parallel.global_batch}: {n} valid layouts, {len(best)} fastest that fit")
            print(f"{'#':>3} {'layout':<48}{'step s':>10}{'FOM':>12}{'MFU':>7}{'GiB':>7}")
            for i, p in enumerate(best, 1):
                print(f"{i:>3} {_layout_str(p.config):<48}{p.step_time_s:>10.3f}{p.fom:>12.4g}"
                      f"{p.mfu:>7.1%}{p.memory_gib_per_device['total']:>7.1f}")
            return 0
        rows = project(cfg, profile, a.nodes or default_nodes(cfg, profile), tokens=a.tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"model": cfg.model.name, "system": profile.name, "tokens": a.tokens, "rows": rows}))
        return 0
    print(f"{cfg.model.name} on {profile.name}: tp {cfg.parallel.tp} × pp {cfg.parallel.pp}, "
          f"{cfg.parallel.num_microbatches} micro-batches per pipeline, {a.tokens:.3g} tokens")
    print(f"{'nodes':>7}{'dp':>6}{'gbs':>8}{'step s':>10}{'FOM':>12}{'MFU':>7}{'tok/s':>12}{'days':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['nodes']:>7}  skipped: {r['error']}")
            continue
        print(f"{r['nodes']:>7}{r['dp']:>6}{r['global_batch']:>8}{r['step_time_s']:>10.2f}{r['fom']:>12.4g}"
              f"{r['mfu']:>7.1%}{r['tokens_per_s']:>12,.0f}{r['time_to_train_days']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
