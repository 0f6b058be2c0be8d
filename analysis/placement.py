"""Where the groups of a parallel axis live: does a group cross nodes, how many of its ranks
share a node (and, on a CPU, each core). The rank order is microbench.model.grid.Grid's
(Megatron's: tp fastest, then dp, then pp), the node size the system's ranks per node.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

from microbench.model.config import TrainConfig
from microbench.model.grid import AXES, Grid

from analysis.errors import AnalysisError


@dataclass(frozen=True, slots=True)
class Placement:
    crosses_nodes: bool
    ranks_per_node_in_group: int
    """Ranks of one group that share a node (the intra-node part of a hierarchical collective)."""
    num_nodes: int
    """Nodes one group spans."""
    num_groups: int
    """Groups of this axis running at once (all of them, in a training step)."""


def host_sharing(df) -> tuple[float, str] | None:
    """How many of a host's ranks share each CPU core for their compute: σ = ranks per node ×
    threads per rank / usable cores, from the manifests of the CPU runs whose GEMM rows price
    the compute (the largest σ over them). (σ, source) when σ > 1; None where each rank has a
    core or a device of its own, or the runs do not say (from before the manifest did)."""
    cols = ["run_ranks_per_node", "run_threads_per_rank", "run_cpu_cores_usable"]
    if any(c not in df.columns for c in [*cols, "kind", "run_device"]):
        return None
    rows = df[(df["kind"] == "gemm") & (df["run_device"] == "cpu")].dropna(subset=cols)
    best = None
    for run, g in rows.groupby(rows["run_dir"] if "run_dir" in rows.columns else rows["run_device"]):
        vals = [g[c].iloc[0] for c in cols]
        try:
            r, t, c = (float(v) for v in vals)
        except (TypeError, ValueError):
            r = t = c = math.nan
        if not all(math.isfinite(v) and v >= 1 and v.is_integer() for v in (r, t, c)):
            shown = [f"{float(v):g}" if isinstance(v, numbers.Real) else repr(v) for v in vals]
            raise AnalysisError(f"{run}: manifest ranks_per_node {shown[0]}, threads_per_rank {shown[1]}, "
                                f"cpu_cores_usable {shown[2]}: each must be a whole number ≥ 1")
        if best is None or r * t / c > best[0]:
            best = (r * t / c, f"measured ({r:g} ranks × {t:g} thread(s) on {c:g} usable cores: {run} manifest)")
    return best if best is not None and best[0] > 1 else None


def group_placement(cfg: TrainConfig, axis: str, *, ranks_per_node: int) -> Placement:
    """Where the groups of ``axis`` live for ``cfg``'s layout (see :func:`grid_placement`)."""
    p = cfg.parallel
    return grid_placement(Grid(tp=p.tp, pp=p.pp, dp=p.dp), axis, ranks_per_node=ranks_per_node)


def grid_placement(grid: Grid, axis: str, *, ranks_per_node: int) -> Placement:
    """Where the groups of ``axis`` live on ``grid`` (its rank order: :meth:`Grid.rank_of`).

    Every group is looked at (TP 8 on 12-rank nodes keeps group 0 inside a node but splits
    group 1): a collective runs as slow as its worst group, so the placement is the worst
    one — crosses nodes if any group does, the fewest ranks per node, the most nodes. A
    group's node pattern depends only on its first rank modulo the node size, and a group's
    first rank modulo the node size repeats once any other axis' coordinate passes the node
    size, so at most ranks_per_node² starts are enumerated and at most ranks_per_node groups
    walked: a 100k-rank world costs milliseconds.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node {ranks_per_node}: must be ≥ 1")
    return _grid_placement(grid, axis, ranks_per_node)


@functools.lru_cache(maxsize=65536)  # pure in its hashable arguments; calibration asks it 10⁵ times
def _grid_placement(grid: Grid, axis: str, rpn: int) -> Placement:
    sizes = {a: getattr(grid, a) for a in AXES}
    if axis not in sizes:
        raise ValueError(f"axis {axis!r}: choose one of {', '.join(AXES)}")
    a, b = (x for x in AXES if x != axis)
    starts: dict[int, dict[str, int]] = {}  # first rank mod node size → the other axes' coordinates
    for i in range(min(sizes[a], rpn)):
        for j in range(min(sizes[b], rpn)):
            fixed = {a: i, b: j}
            starts.setdefault(grid.rank_of(**fixed, **{axis: 0}) % rpn, fixed)
    worst_nodes, fewest = 1, sizes[axis]
    for fixed in starts.values():
        base = grid.rank_of(**fixed, **{axis: 0})
        stride = grid.rank_of(**fixed, **{axis: 1}) - base if sizes[axis] > 1 else 1
        nodes, least = _span(base, stride, sizes[axis], rpn)
        worst_nodes, fewest = max(worst_nodes, nodes), min(fewest, least)
    return Placement(crosses_nodes=worst_nodes > 1, ranks_per_node_in_group=max(1, fewest),
                     num_nodes=worst_nodes, num_groups=grid.size // sizes[axis])


def _span(base: int, stride: int, n: int, rpn: int) -> tuple[int, int]:
    """(nodes, fewest ranks on one of them) of the group ``base + stride·k``, ``k < n``, on nodes
    of ``rpn`` ranks, in O(rpn) whatever ``n`` (a group of 10⁸ ranks is not walked). A stride
    of a node or more puts every rank on a node of its own; a shorter one skips no node, and the
    count on the nodes between the first and the last repeats with a period of at most
    ``stride`` nodes (``m·rpn mod stride`` does)."""
    if stride >= rpn:
        return n, 1
    first, last = base // rpn, (base + stride * (n - 1)) // rpn

    def on(m: int) -> int:  # ranks of the group on node m: k with m·rpn ≤ base + stride·k < (m+1)·rpn
        lo, hi = -(-(m * rpn - base) // stride), -(-((m + 1) * rpn - base) // stride)
        return min(n, hi) - max(0, lo)
    between = range(first + 1, min(last, first + 1 + stride))
    return last - first + 1, min(on(m) for m in (first, last, *between))
