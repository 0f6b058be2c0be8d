"""Where the groups of a parallel axis live: does a group cross nodes, how many of its ranks
share a node. Megatron's order (tp fastest, then dp, then pp) and the system's ranks per node.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from microbench.config import TrainConfig


@dataclass(frozen=True, slots=True)
class Placement:
    crosses_nodes: bool
    ranks_per_node_in_group: int
    """Ranks of one group that share a node (the intra-node part of a hierarchical collective)."""
    num_nodes: int
    """Nodes one group spans."""
    num_groups: int
    """Groups of this axis running at once (all of them, in a training step)."""


@functools.lru_cache(maxsize=65536)  # pure in its (frozen, hashable) arguments; calibration asks it 10⁵ times
def group_placement(cfg: TrainConfig, axis: str, *, ranks_per_node: int) -> Placement:
    """Where the groups of ``axis`` live, Megatron order: rank = t + tp·(d + dp·p).

    Every group is looked at (TP 8 on 12-rank nodes keeps group 0 inside a node but splits
    group 1): a collective runs as slow as its worst group, so the placement is the worst
    one — crosses nodes if any group does, the fewest ranks per node, the most nodes. A
    group's node pattern depends only on its first rank modulo the node size, so at most
    ranks_per_node distinct starts need looking at.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node {ranks_per_node}: must be ≥ 1")
    p = cfg.parallel
    size, stride = {"tp": (p.tp, 1), "dp": (p.dp, p.tp), "pp": (p.pp, p.tp * p.dp)}[axis]
    rpn = ranks_per_node
    if axis == "tp":
        starts = {(p.tp * j) % rpn for j in range(min(p.dp * p.pp, rpn))}
    elif axis == "dp":
        starts = {(t + p.tp * p.dp * k) % rpn for t in range(p.tp) for k in range(min(p.pp, rpn))}
    else:
        starts = {(t + p.tp * d) % rpn for t in range(p.tp) for d in range(min(p.dp, rpn))}
    worst_nodes, fewest = 1, size
    for r in starts:
        per_node: dict[int, int] = {}
        for i in range(size):
            node = (r + i * stride) // rpn
            per_node[node] = per_node.get(node, 0) + 1
        worst_nodes = max(worst_nodes, len(per_node))
        fewest = min(fewest, min(per_node.values()))
    return Placement(crosses_nodes=worst_nodes > 1, ranks_per_node_in_group=max(1, fewest),
                     num_nodes=worst_nodes, num_groups=p.world_size // size)
