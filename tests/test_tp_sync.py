"""The TP reduction's in-step cost (issue 20, item 3): its count in the workload by hand, its
price from a tp_sync row by hand, the spec's honest answer, and the probe on two real ranks
(its check catching a corrupted rank)."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from analysis import load
from analysis.measured import MeasuredProfile
from analysis.predict import predict
from analysis.spec import SpecProfile
from microbench.model.config import preset, with_layout
from microbench.model.workload import TpSync, workload
from tests.launch import run_local

MDS = preset("mds-cpu")


def layout(**kw):
    return with_layout(MDS, **{"tp": 1, "pp": 1, "dp": 1, **kw}, global_batch=MDS.parallel.global_batch)


def test_one_sync_per_tp_reduction_by_hand():
    """mds-cpu tp2: T = 512 tokens × d 512 = 262,144 elements per reduction; 2 forward (attention
    projection, FC2) and 2 backward (the QKV and FC1 input gradients) per layer and micro-batch;
    the embedding's forward and the LM head input's backward reduction once per micro-batch."""
    w = workload(layout(tp=2))
    assert [(s.phase, s.count, s.elements, s.group_size) for s in w.syncs] == [
        ("fwd", 2, 262_144, 2), ("bwd", 2, 262_144, 2)]
    assert [(s.name, s.phase) for s in w.first + w.last if isinstance(s, TpSync)] == [
        ("embedding_tp_reduce_sync", "fwd"), ("lm_head_tp_reduce_sync", "bwd")]
    assert workload(layout(dp=2)).syncs == () and not any(isinstance(s, TpSync) for s in workload(layout(dp=2)).last)
    full = workload(dataclasses.replace(layout(tp=2), parallel=dataclasses.replace(
        layout(tp=2).parallel, recompute="full")))
    assert sorted((s.phase, s.count) for s in full.syncs) == [("bwd", 2), ("fwd", 2), ("recompute", 2)]


def _profile(sync_us: float, *, elements: int = 262_144) -> MeasuredProfile:
    row = {"kind": "tp_sync", "status": "ok", "num_wrong": 0, "op": "tp_sync", "elements": elements,
           "dtype": "fp32", "group_size": 2, "layers": 4, "time_us": 5e5, "time_us_mean": 5e5,
           "allreduce_in_step_us": 2500.0 + sync_us, "allreduce_alone_us": 2500.0, "sync_us": sync_us}
    return MeasuredProfile.from_rows(pd.DataFrame([row]), fallback="aurora")


def test_prediction_prices_every_reduction_from_the_row_by_hand():
    """1.5 ms per reduction: 4 per layer × 4 layers × 8 micro-batches = 128 in the layers (tp_comm),
    2 per micro-batch at the ends (embedding_head): 192 ms + 24 ms, named by the probe."""
    cfg = layout(tp=2)
    with_sync, without = predict(cfg, _profile(1500.0), dp_overlap=False), predict(cfg, _profile(0.0), dp_overlap=False)
    assert with_sync.step_time_s - without.step_time_s == pytest.approx(0.216, rel=1e-9)
    assert with_sync.breakdown_s["tp_comm"] - without.breakdown_s["tp_comm"] == pytest.approx(0.192, rel=1e-9)
    src = [s for s in with_sync.provenance_s["tp_comm"] if "tp_sync probe" in s]
    assert len(src) == 1 and src[0].startswith("measured (tp_sync probe, n=2, 4 layers fwd+bwd")
    assert with_sync.provenance_s["tp_comm"][src[0]] == pytest.approx(0.192, rel=1e-9)
    assert "tp_sync probe" in with_sync.sources["tp_comm"]


def test_negative_sync_is_clamped_and_another_size_is_left_to_the_spec():
    """The framework probe's narrowed run (hidden 64) must not be priced with the full-width
    probe's waits: its own are in the host time it measures."""
    op = workload(layout(tp=2)).syncs[0]
    neg = _profile(-300.0).tp_sync(op)
    assert neg.seconds == 0.0 and "-300 us clamped to 0" in neg.source
    other = _profile(1000.0, elements=65_536).tp_sync(op)
    assert other.seconds == 0.0 and other.source.startswith("specified (no in-step term")


def test_a_spec_says_it_has_no_separate_term():
    p = SpecProfile.from_yaml("aurora")
    priced = p.tp_sync(workload(layout(tp=2)).syncs[0])
    assert priced.seconds == 0.0
    assert priced.source.startswith("specified (no in-step term apart from the reduction's own price: ")
    assert "network.intra.latency" in p.sources()["tp_sync"]


TPS = ["--model", "tiny", "--tp", "2", "-n", "3", "-w", "1", "-d", "fp32", "--quiet"]


@pytest.mark.multirank
def test_tp_sync_probe_on_two_ranks_loads_and_prices(tmp_path):
    res = run_local("microbench.tp_sync", *TPS, "--out", str(tmp_path / "s"), ranks=2, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    df = load(tmp_path / "s")
    r = df.iloc[0]
    assert len(df) == 1 and r["kind"] == "tp_sync" and r["num_wrong"] == 0 and r["num_checked"] > 0
    # tiny: mbs 2 × seq 128 × hidden 128 per reduction, 4 layers × 4 reductions
    assert (r["elements"], r["group_size"], r["num_reductions"]) == (2 * 128 * 128, 2, 16)
    assert r["allreduce_in_step_us"] > 0 and r["allreduce_alone_us"] > 0
    assert r["sync_us"] == pytest.approx(r["allreduce_in_step_us"] - r["allreduce_alone_us"])
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    op = workload(with_layout(preset("tiny"), tp=2, pp=1, dp=1, global_batch=8)).syncs[0]
    assert prof.tp_sync(op).seconds == pytest.approx(max(0.0, r["sync_us"]) * 1e-6)


@pytest.mark.multirank
def test_tp_sync_check_catches_a_corrupted_rank(tmp_path):
    """Rank 1's activation scaled by 0.99 after the chain: it no longer equals rank 0's."""
    res = run_local("microbench.tp_sync", *TPS, "--out", str(tmp_path / "s"), ranks=2, timeout=180,
                    MICROBENCH_FAULT="corrupt:1:scale=0.99")
    assert res.returncode == 1, res.stderr[-2000:]
    r = load(tmp_path / "s").iloc[0]
    assert r["status"] == "failed" and r["num_wrong"] > 0
