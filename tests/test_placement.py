"""Where a parallel axis' groups live (analysis.placement) read from the one rank order,
microbench.model.grid.Grid: the same answers as the Megatron formula it replaces, as every
group enumerated one by one, and fast for 100k-rank worlds."""
import itertools
import time

import pytest

from analysis.placement import Placement, _grid_placement, grid_placement, group_placement
from microbench.model.config import ModelConfig, ParallelConfig, TrainConfig
from microbench.model.grid import Grid

TPS, PPS, DPS = (1, 2, 3, 4, 6, 8, 12, 16), (1, 2, 3, 4, 8, 64), (1, 2, 3, 5, 6, 16, 128)
RANKS_PER_NODE = (1, 2, 4, 6, 8, 12, 16)


def _cfg(tp: int, pp: int, dp: int) -> TrainConfig:
    """Any layout of TPS × PPS × DPS: dimensions divisible by every tp (lcm 48) and pp (lcm 192)."""
    model = ModelConfig(num_layers=192, hidden=384, num_heads=48, ffn_hidden=1536, seq_len=64, vocab_size=4800)
    return TrainConfig(model=model, parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, global_batch=dp))


def _megatron_formula(cfg: TrainConfig, axis: str, *, ranks_per_node: int) -> Placement:
    """The formula group_placement used before it read the Grid (rank = t + tp·(d + dp·p))."""
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


@pytest.mark.parametrize("axis", ["tp", "dp", "pp"])
def test_grid_placement_is_the_megatron_formula(axis):
    n = 0
    for tp, pp, dp, rpn in itertools.product(TPS, PPS, DPS, RANKS_PER_NODE):
        cfg = _cfg(tp, pp, dp)
        want = _megatron_formula(cfg, axis, ranks_per_node=rpn)
        assert grid_placement(Grid(tp=tp, pp=pp, dp=dp), axis, ranks_per_node=rpn) == want, (tp, pp, dp, rpn)
        n += 1
    assert n == len(TPS) * len(PPS) * len(DPS) * len(RANKS_PER_NODE) == 2352


def _every_group(grid: Grid, axis: str, rpn: int) -> Placement:
    """No shortcut: every group of the axis (Grid.groups), every rank's node."""
    groups = grid.groups(axis)
    spans = [{r // rpn for r in g} for g in groups]
    fewest = min(min(sum(1 for r in g if r // rpn == n) for n in nodes) for g, nodes in zip(groups, spans))
    worst = max(len(nodes) for nodes in spans)
    return Placement(crosses_nodes=worst > 1, ranks_per_node_in_group=fewest, num_nodes=worst,
                     num_groups=len(groups))


@pytest.mark.parametrize("axis", ["tp", "dp", "pp"])
def test_grid_placement_is_every_group_looked_at(axis):
    for tp, pp, dp, rpn in itertools.product((1, 2, 3, 4, 8), (1, 2, 3, 5), (1, 2, 3, 6), (1, 3, 4, 8, 12)):
        grid = Grid(tp=tp, pp=pp, dp=dp)
        assert grid_placement(grid, axis, ranks_per_node=rpn) == _every_group(grid, axis, rpn), (tp, pp, dp, rpn)


def test_group_placement_reads_the_layout():
    cfg = _cfg(8, 4, 6)
    assert group_placement(cfg, "dp", ranks_per_node=12) == grid_placement(Grid(tp=8, pp=4, dp=6), "dp",
                                                                            ranks_per_node=12)


def test_a_100k_rank_world_is_placed_from_a_few_ranks(monkeypatch):
    """Not walked rank by rank: a group is placed from a handful of its ranks' numbers, so the
    work does not grow with the world (before, ``analysis.project --nodes 10**20`` never
    finished: each DP group was walked, 7 s at 10⁸ nodes)."""
    calls = []
    real = Grid.rank_of
    monkeypatch.setattr(Grid, "rank_of", lambda self, **kw: calls.append(1) or real(self, **kw))
    grid = Grid(tp=12, pp=64, dp=136)  # 104,448 ranks on 8,704 nodes of 12
    _grid_placement.cache_clear()
    got = {axis: grid_placement(grid, axis, ranks_per_node=12) for axis in ("tp", "dp", "pp")}
    assert got["tp"] == Placement(crosses_nodes=False, ranks_per_node_in_group=12, num_nodes=1, num_groups=8704)
    assert got["dp"] == Placement(crosses_nodes=True, ranks_per_node_in_group=1, num_nodes=136, num_groups=768)
    assert got["pp"] == Placement(crosses_nodes=True, ranks_per_node_in_group=1, num_nodes=64, num_groups=1632)
    assert len(calls) <= 3 * (12 * 12 + 2 * 12)  # the starts (≤ rpn²) and two ranks per start, per axis
    huge = Grid(tp=12, pp=64, dp=10**18)
    _grid_placement.cache_clear()
    assert grid_placement(huge, "dp", ranks_per_node=12) == Placement(
        crosses_nodes=True, ranks_per_node_in_group=1, num_nodes=10**18, num_groups=768)
    _grid_placement.cache_clear()


def test_a_short_stride_group_is_placed_as_walking_it_would(monkeypatch):
    """The closed form against the walk, where groups span many nodes with a stride under the
    node size (tp 1–5 on nodes of 6–12 ranks; dp groups of up to 97)."""
    for tp, pp, dp, rpn in itertools.product((1, 2, 3, 5), (1, 2, 7), (29, 97), (6, 8, 12)):
        grid = Grid(tp=tp, pp=pp, dp=dp)
        _grid_placement.cache_clear()
        assert grid_placement(grid, "dp", ranks_per_node=rpn) == _every_group(grid, "dp", rpn), (tp, pp, dp, rpn)


def test_a_bad_axis_or_node_size_is_refused():
    with pytest.raises(ValueError, match="ranks_per_node 0"):
        grid_placement(Grid(tp=2, pp=1, dp=1), "tp", ranks_per_node=0)
    with pytest.raises(ValueError, match="axis 'ep'"):
        grid_placement(Grid(tp=2, pp=1, dp=1), "ep", ranks_per_node=8)


def _runs(*runs):
    """GEMM rows of CPU runs: (run_dir, ranks per node, threads per rank, usable cores)."""
    import pandas as pd
    return pd.DataFrame([{"kind": "gemm", "run_device": "cpu", "run_dir": d, "run_ranks_per_node": r,
                          "run_threads_per_rank": t, "run_cpu_cores_usable": c} for d, r, t, c in runs])


def test_host_sharing_from_the_compute_runs_manifests():
    import pandas as pd
    from analysis.placement import host_sharing
    sigma, src = host_sharing(_runs(("tp2", 2, 1, 2), ("tp2pp2", 4, 1, 2)))
    assert sigma == 2.0 and src == "measured (4 ranks × 1 thread(s) on 2 usable cores: tp2pp2 manifest)"
    assert host_sharing(_runs(("a", 2, 1, 2), ("b", 1, 2, 2))) is None   # a core per thread
    assert host_sharing(_runs(("a", 4, 1, 8))) is None                    # cores to spare
    gpu = _runs(("g", 8, 1, 2)).assign(run_device="cuda")
    assert host_sharing(gpu) is None                                       # each rank its device
    assert host_sharing(_runs(("old", 4, 1, 2)).drop(columns="run_cpu_cores_usable")) is None
    assert host_sharing(_runs(("old", 4, 1, float("nan")))) is None      # a run from before it was recorded
    assert host_sharing(pd.DataFrame({"kind": ["gemm"]})) is None


@pytest.mark.parametrize("bad", [0, 1.5, -2, "two"])
def test_a_corrupted_core_count_is_refused_naming_the_run_and_value(bad):
    from analysis.errors import AnalysisError
    from analysis.placement import host_sharing
    with pytest.raises(AnalysisError, match=rf"runs/x: manifest ranks_per_node 4, threads_per_rank 1, "
                                            rf"cpu_cores_usable {bad!r}: each must be a whole number ≥ 1"):
        host_sharing(_runs(("runs/x", 4, 1, bad)))
