"""The reference step: the parallelism is real (same loss as one rank), the CLI refuses bad input.

Loss equivalence: fp32 on CPU, the tiny preset, seed 1234, the same synthetic global batch
(8 sequences) on every layout, 3 AdamW steps. Every layout must reproduce the single-rank
loss of each iteration within REL_TOL. Only the order of floating-point sums differs between
layouts (TP splits GEMM reductions and the vocab softmax, DP averages gradients), which in
fp32 moves the loss by ~1e-7 relative; a wrong shard, a missing allreduce or a schedule bug
moves it by > 1e-3 after the first update.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import have_mpi, run_local, run_mpi

REL_TOL = 1e-4
STEPS = 3
COMMON = ("--model", "tiny", "--steps", str(STEPS), "--gbs", "8", "--quiet", "--timeout-s", "60")


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "train_step"]
    assert [r["iteration"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["status"] == "ok" for r in steps)
    return [r["lm_loss"] for r in steps]


def _train(tmp_path: Path, name: str, *flags: str, ranks: int) -> list[float]:
    out = tmp_path / name
    res = run_local("full_model.train", *COMMON, *flags, "--out", str(out), ranks=ranks, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return _losses(out)


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> list[float]:
    return _train(tmp_path_factory.mktemp("single"), "tp1", ranks=1)


def test_single_rank_trains(single_rank):
    assert single_rank[-1] < single_rank[0] - 0.1, single_rank


@pytest.mark.multirank
@pytest.mark.parametrize("name,flags,ranks", [
    ("tp2", ("--tp", "2"), 2),
    ("pp2", ("--pp", "2"), 2),
    ("dp2", ("--dp", "2"), 2),
    ("tp2pp2", ("--tp", "2", "--pp", "2"), 4),
    ("dp2_zero1", ("--dp", "2", "--zero", "1", "--bucket-mb", "0.1"), 2),
    ("tp2_sp_recompute", ("--tp", "2", "--sequence-parallel", "--recompute", "full"), 2),
])
def test_loss_matches_single_rank(tmp_path, single_rank, name, flags, ranks):
    losses = _train(tmp_path, name, *flags, ranks=ranks)
    for it, (got, ref) in enumerate(zip(losses, single_rank), 1):
        assert abs(got - ref) <= REL_TOL * abs(ref), f"{name} iteration {it}: {got} vs single rank {ref}"


@pytest.mark.multirank
def test_rows_and_megatron_lines(tmp_path):
    out = tmp_path / "run"
    res = run_local("full_model.train", "--model", "tiny", "--pp", "2", "--steps", "3",
                    "--out", str(out), ranks=2, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    from full_model.megatron.logparse import parse_log
    parsed = parse_log(res.stdout.splitlines())
    assert list(parsed.iterations["iteration"]) == [1, 2, 3]
    assert parsed.iterations["global_batch_size"].tolist() == [8, 8, 8]
    assert parsed.iterations["tflops_lm"].notna().all()
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["kind"] == "train_summary" and summary["iters"] == 2 and summary["warmup"] == 1
    assert set(summary["timers_us"]) == {"forward", "backward", "p2p_wait", "dp_sync", "optimizer"}
    assert summary["timers_us"]["p2p_wait"] > 0  # pp 2 really waits on its neighbour
    assert summary["time_us_min"] <= summary["time_us_median"] <= summary["time_us_max"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["parallel"]["pp"] == 2 and manifest["probe"] == "full_model.train"


@pytest.mark.mpi
@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")
def test_mpiexec_tp2_pp2_matches_single_rank(tmp_path, single_rank):
    out = tmp_path / "mpi"
    res = run_mpi("full_model.train", *COMMON, "--tp", "2", "--pp", "2", "--out", str(out), ranks=4, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    for got, ref in zip(_losses(out), single_rank):
        assert abs(got - ref) <= REL_TOL * abs(ref)


@pytest.mark.parametrize("flags,needle", [
    (("--tp", "3"), "num_heads(8) % tp(3)"),
    (("--pp", "3"), "num_layers(4) % (pp(3)"),
    (("--dp", "3", "--gbs", "8"), "global_batch(8)"),
    (("--model", "nope"), "unknown preset"),
    (("--steps", "2", "--warmup-steps", "2"), "--warmup-steps 2"),
])
def test_bad_layout_is_one_line_exit_2(flags, needle):
    res = run_local("full_model.train", "--steps", "2", *flags, ranks=1, timeout=60)
    assert res.returncode == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_synthetic_batch_is_layout_free():
    from full_model.reference.step import synthetic_batch
    from microbench.model.config import tiny, with_layout
    a = synthetic_batch(tiny(), seed=1, step=2)
    b = synthetic_batch(with_layout(tiny(), tp=2, pp=2), seed=1, step=2)
    assert a.shape == (8, 129) and bool((a == b).all())
    assert not bool((a == synthetic_batch(tiny(), seed=1, step=3)).all())


def test_scale_keeps_head_dim_and_tp_divisibility():
    from full_model.train import scaled
    from microbench.model.config import alcf_1t
    m = scaled(alcf_1t().model, 0.1, 12)
    assert m.head_dim == 128 and m.num_heads % 12 == 0 and m.ffn_hidden % 12 == 0
