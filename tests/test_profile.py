"""System profiles: shipped specs load, placement follows Megatron order, measured rows override."""
import dataclasses

import pandas as pd
import pytest

from analysis.predict import predict
from analysis.measured import MeasuredProfile, load_profile
from analysis.placement import Placement, group_placement
from analysis.spec import SpecProfile
from microbench.model.systems import shipped_systems
from microbench.model.config import preset, with_layout
from microbench.runtime.results import RunWriter
from microbench.model.workload import Collective, Gemm, workload


def test_shipped_systems_load():
    names = shipped_systems()
    for required in ("dgx-a100-80gb", "dgx-a100-40gb", "dgx-h100", "aurora", "polaris"):
        assert required in names
    for n in names:
        SpecProfile.from_yaml(n)  # the schema's checks (tests/test_spec.py) pass for every shipped file
    assert SpecProfile.from_yaml("aurora").ranks_per_node == 12
    assert SpecProfile.from_yaml("polaris").ranks_per_node == 4


def test_unknown_system_lists_shipped():
    with pytest.raises(ValueError, match="unknown system 'nope'.*aurora"):
        SpecProfile.from_yaml("nope")


def test_gemm_efficiency_quantization():
    p = SpecProfile.from_yaml("dgx-a100-80gb")
    big = Gemm("x", "fwd", 8192, 8192, 8192)
    ragged = Gemm("x", "fwd", 8192, 8192 + 1, 8192)     # one extra column costs a tile row
    small_k = Gemm("x", "fwd", 8192, 8192, 16)
    assert p.gemm_efficiency(ragged) < p.gemm_efficiency(big) <= p.gemm_max
    assert p.gemm(small_k).seconds >= small_k.bytes / (p.mem_bw_gbps * 1e9)  # memory bound


def test_placement_megatron_order():
    cfg = preset("alcf-1t")  # tp 12 inside a node, pp 64 across nodes
    assert not group_placement(cfg, "tp", ranks_per_node=12).crosses_nodes
    pp = group_placement(cfg, "pp", ranks_per_node=12)
    assert pp.crosses_nodes and pp.num_nodes == 64
    c = with_layout(cfg, tp=4, pp=1, dp=6, micro_batch=1, global_batch=6)
    dp = group_placement(c, "dp", ranks_per_node=12)
    assert dp.crosses_nodes and dp.num_nodes == 2 and dp.ranks_per_node_in_group == 3  # ranks 0,4,8 | 12,16,20


def test_hierarchical_collective_slower_across_nodes():
    p = SpecProfile.from_yaml("dgx-h100")
    c = Collective("x", "allreduce", "dp", 1 << 28, "bf16", 1, "step", 16)
    intra = p.collective(c, Placement(False, 8, 1, 1)).seconds
    inter = p.collective(c, Placement(True, 1, 16, 8)).seconds
    # By hand from dgx-h100.yaml: S = 2^28 bf16 = 536,870,912 B; allreduce bus factor
    # 2(n−1)/n = 1.875 for n = 16. Inside a node: a ring, 6.6 µs + 0.6 µs × 2(n − 1) = 24.6 µs,
    # + 1.875·S / (450 GB/s × 0.80).
    assert intra == pytest.approx(24.6e-6 + 1_006_632_960 / 360e9, rel=1e-12)  # 2.821 ms
    # Across 16 nodes, one rank of the group per node, 8 groups at once: each rank has 1/8 of
    # the node's 8 NICs × 50 GB/s × 0.85 = 42.5 GB/s, and a tree, 6.8 µs + 5 µs × 2·log2 16.
    assert inter == pytest.approx(1_006_632_960 / 42.5e9 + 46.8e-6, rel=1e-12)  # 23.73 ms


def _rows(cfg, scale=2.0):
    """Synthetic probe rows for exactly the workload's GEMMs (scale × the spec time)."""
    spec = SpecProfile.from_yaml("dgx-a100-80gb")
    w = workload(cfg)
    rows = []
    for g in w.gemms + w.head_gemms:
        rows.append(dict(kind="gemm", op=g.name, phase=g.phase, m=g.m, n=g.n, k=g.k, batch=g.batch,
                         dtype=g.dtype, time_us=scale * spec.gemm(g).seconds * 1e6, status="ok"))
    rows.append(dict(kind="gemm", op="qkv", phase="fwd", m=1, n=1, k=1, batch=1, dtype=cfg.model.dtype,
                     time_us=1e9, status="failed"))  # a failed row: refused unless left out on request
    for size in (1 << 20, 1 << 24, 1 << 28):
        rows.append(dict(kind="allreduce", axis="tp", group_size=2, crosses_nodes=False, size_bytes=size,
                         time_us=10 + size / 50e3, status="ok"))
        rows.append(dict(kind="memop", op="norm", phase="fwd", bytes_moved=size, time_us=3 + size / 1e6,
                         status="ok"))
    rows.append(dict(kind="overlap", axis="dp", extra={"exposed_fraction": 0.25}, status="ok"))
    return pd.DataFrame(rows)


def test_measured_overrides_spec_and_records_sources():
    cfg = with_layout(preset("llama2-7b"), tp=2, dp=4)
    with pytest.raises(ValueError, match=r"1 failed row\(s\).*--include-failed"):
        MeasuredProfile.from_rows(_rows(cfg), fallback="dgx-a100-80gb")
    prof = MeasuredProfile.from_rows(_rows(cfg), fallback="dgx-a100-80gb", include_failed=True)
    assert prof.notes == ["left out 1 failed row(s) (0 with num_wrong > 0) (--include-failed)"]
    assert (1, 1, 1, 1, cfg.model.dtype) not in prof.gemm_table
    src = prof.sources()
    assert src["gemm"].startswith("measured") and src["collective.intra"] == "measured (allreduce n=2)"
    assert src["memop"].startswith("measured") and src["overlap.dp"] == "measured"
    assert src["collective.inter"].startswith("specified (analysis/systems/dgx-a100-80gb.yaml: ")
    assert src["p2p.inter"].startswith("specified (analysis/systems/dgx-a100-80gb.yaml: network.inter")
    g = workload(cfg).gemms[0]
    spec = SpecProfile.from_yaml("dgx-a100-80gb")
    assert prof.gemm(g).seconds == pytest.approx(2 * spec.gemm(g).seconds)
    # an unmeasured shape is interpolated: spec shape dependence × the measured correction
    other = dataclasses.replace(g, m=g.m * 2)
    assert prof.gemm(other).seconds == pytest.approx(2 * spec.gemm(other).seconds, rel=0.05)
    c = workload(cfg).collectives[0]
    assert prof.collective(c, Placement(False, 2, 1, 1)).seconds == pytest.approx((10 + c.bytes / 50e3) * 1e-6, rel=1e-6)
    assert prof.overlap("dp").seconds == 0.25
    slow, fast = predict(cfg, prof), predict(cfg, spec)
    # every GEMM of the step measured at twice its spec time: the GEMM component doubles exactly;
    # attention, which no row measures, stays the spec's
    assert slow.breakdown_s["gemm"] == pytest.approx(2 * fast.breakdown_s["gemm"], rel=1e-12)
    assert slow.breakdown_s["attention"] == fast.breakdown_s["attention"]
    assert slow.step_time_s > fast.step_time_s


def test_a_row_of_a_kind_no_profile_reads_is_left_out_and_said():
    """A corrupted kind ('gemn') was dropped without a word: the GEMM it timed fell back to
    the spec, and nothing said a measured row had been ignored."""
    cfg = with_layout(preset("llama2-7b"), tp=2, dp=4)
    rows = _rows(cfg).query("status == 'ok'").reset_index(drop=True)
    good = MeasuredProfile.from_rows(rows, fallback="dgx-a100-80gb")
    assert good.notes == []
    first = rows.index[rows["kind"] == "gemm"][0]
    rows.loc[first, "kind"] = "gemn"
    prof = MeasuredProfile.from_rows(rows, fallback="dgx-a100-80gb")
    assert prof.notes == ["left out 1 row(s) of a kind no profile reads: gemn"]
    assert len(prof.gemm_table) == len(good.gemm_table) - 1


def test_an_attention_row_without_a_flop_count_is_left_out_and_said():
    """NaN is true in Python: an attention row whose flop was missing gave a NaN rate, and the
    prediction printed NaN with exit 0. Now it is left out with a note; the step is finite."""
    import math

    import pandas as pd
    cfg = with_layout(preset("llama2-7b"), tp=2, dp=4)
    rows = _rows(cfg).query("status == 'ok'").reset_index(drop=True)
    att = {"probe": "attention", "kind": "attention", "status": "ok", "path": "explicit", "phase": "fwd",
           "dtype": cfg.model.dtype, "time_us": 100.0, "time_us_mean": 100.0, "iters": 3}
    both = pd.concat([rows, pd.DataFrame([{**att, "flop": 1e9}, {**att, "flop": float("nan")}])], ignore_index=True)
    prof = MeasuredProfile.from_rows(both, fallback="dgx-a100-80gb")
    assert prof.notes == ["left out 1 attention row(s) without a flop count > 0 and a time > 0 (nothing to take a "
                          "rate from)"]
    assert prof.attention_rates[("explicit", "fwd")] == [(1e9, pytest.approx(1e9 / 100e-6))]
    assert math.isfinite(predict(cfg, prof).step_time_s)


def test_profile_from_run_dir_uses_same_code_path(tmp_path, capsys):
    cfg = preset("tiny")
    run = tmp_path / "run1"
    with RunWriter(run, {"probe": "gemm"}) as w:
        for r in _rows(cfg, scale=1.0).query("status == 'ok'").to_dict("records"):
            w.write_row({k: v for k, v in r.items() if not (isinstance(v, float) and v != v)})
    prof = load_profile(system="dgx-a100-80gb", profile_dirs=[str(run)])
    assert isinstance(prof, MeasuredProfile) and prof.sources()["gemm"].startswith("measured")
    pr = predict(cfg, prof)
    assert pr.sources["gemm"] == "measured"  # every GEMM of the step at its exact shape
    from analysis.predict import main
    assert main(["--model", "tiny", "--system", "dgx-a100-80gb", "--profile", str(run), "--json"]) == 0
    assert '"gemm": "measured"' in capsys.readouterr().out


def test_measured_without_a_spec_is_refused_naming_what_is_missing():
    df = pd.DataFrame([dict(kind="allreduce", group_size=2, size_bytes=1e6, time_us=50.0, status="ok")])
    with pytest.raises(ValueError, match=r"measures collective\.intra but not peak, memory, gemm, .*"
                                         r"collective\.inter, .*give --system NAME"):
        MeasuredProfile.from_rows(df)
    with pytest.raises(ValueError, match="no rows"):
        MeasuredProfile.from_rows(df.assign(status="failed"), fallback="aurora", include_failed=True)


def test_placement_looks_at_every_group():
    # TP 8 on 12-rank nodes: group 0 (ranks 0–7) fits a node, group 1 (8–15) straddles two
    cfg = with_layout(preset("alcf-1t"), tp=8, pp=32, dp=3, global_batch=96 * 3)
    tp = group_placement(cfg, "tp", ranks_per_node=12)
    assert tp.crosses_nodes and tp.ranks_per_node_in_group == 4 and tp.num_nodes == 2


def _attention_rows(fused_s, explicit_s):
    w = workload(preset("tiny"))
    fwd = next(a for a in w.attention if a.phase == "fwd")
    return pd.DataFrame([
        {"kind": "attention", "op": "attention_core", "phase": "fwd", "path": "fused",
         "flop": fwd.flop, "time_us": fused_s * 1e6, "status": "ok"},
        {"kind": "attention", "op": "attention_core", "phase": "fwd", "path": "explicit",
         "flop": fwd.flop, "time_us": explicit_s * 1e6, "status": "ok"}]), fwd


def test_explicit_attention_pays_for_its_score_traffic():
    """Unfused attention writes the s×s scores (Q·Kᵀ) and reads them back (P·V); with a short
    head the traffic, not the arithmetic, sets the time, so a slower memory makes it slower
    and it is never cheaper than moving those bytes once each way."""
    from microbench.model.workload import Attention
    p = SpecProfile.from_yaml("dgx-a100-80gb")
    att = Attention("fwd", batch=2, heads=16, kv_heads=16, seq=2048, head_dim=64, dtype="fp16")
    score_bytes = att.batch * att.heads * att.seq * att.seq * 2
    slow = p.with_knobs({"efficiency.memop": 0.25})
    assert slow.attention(att).seconds >= 2 * score_bytes / (slow.mem_bw_gbps * 1e9 * 0.25)
    assert slow.attention(att).seconds > p.attention(att).seconds
    bwd = dataclasses.replace(att, phase="bwd")
    assert p.attention(bwd).seconds > p.attention(att).seconds  # four GEMMs, one of them writing dP


def test_attention_is_priced_on_the_path_the_framework_takes():
    df, fwd = _attention_rows(1e-3, 4e-3)
    spec = SpecProfile.from_yaml("aurora")
    assert spec.attention_fused  # the Aurora spec runs fused attention
    assert MeasuredProfile.from_rows(df, fallback=spec).attention(fwd).seconds == pytest.approx(1e-3)
    unfused = spec.with_knobs({"efficiency.attention_fused": False})
    assert not unfused.attention_fused
    assert MeasuredProfile.from_rows(df, fallback=unfused).attention(fwd).seconds == pytest.approx(4e-3)


def test_the_softmax_timed_inside_the_explicit_attention_probe_is_not_priced_again():
    """The explicit path's timed call holds the scores' mask and softmax (``attend``), so the
    workload's separate softmax is 0 where that path was measured in the phase, and says
    why; where it was not (only fused rows, or only a forward row for the backward), the
    softmax keeps its own measured price."""
    from microbench.model.workload import MemOp
    df, fwd = _attention_rows(1e-3, 4e-3)
    softmax = [dict(kind="memop", op="softmax", phase="fwd", bytes_moved=b, time_us=2 + b / 1e4, status="ok")
               for b in (1 << 16, 1 << 20)]
    rows = pd.concat([df, pd.DataFrame(softmax)], ignore_index=True)
    unfused = SpecProfile.from_yaml("aurora").with_knobs({"efficiency.attention_fused": False})
    op = MemOp("softmax", "fwd", 1 << 17, 1 << 20, "fp32", 1, True)
    inside = MeasuredProfile.from_rows(rows, fallback=unfused)
    for phase in ("fwd", "recompute"):
        priced = inside.memop(dataclasses.replace(op, phase=phase))
        assert priced.seconds == 0.0 and "explicit attention probe" in priced.source
    assert inside.memop(dataclasses.replace(op, phase="bwd")).seconds > 0  # no backward row measured
    only_fused = MeasuredProfile.from_rows(rows[rows["path"] != "explicit"], fallback=unfused)
    assert only_fused.memop(op).seconds == pytest.approx((2 + (1 << 20) / 1e4) * 1e-6, rel=1e-6)


def test_a_copy_into_a_new_buffer_is_priced_from_its_own_rows_or_says_what_stands_in():
    """The step's copies into new buffers (workload.FRESH_COPY) take layer_ops' copy_fresh rows;
    a profile without them prices the copy as a warm one and says the first touch is left out."""
    from microbench.model.workload import FRESH_COPY, MemOp
    copy = [dict(kind="memop", op="copy", phase="fwd", bytes_moved=1 << 27, time_us=10_000.0, status="ok")]
    fresh = [dict(kind="memop", op=FRESH_COPY, phase="step", bytes_moved=b, time_us=t, status="ok")
             for b, t in ((75_000_000, 30_000.0), (150_000_000, 59_000.0))]
    op = MemOp(FRESH_COPY, "step", 18_750_000, 150_000_000, "fp32", 2, inner=18_750_000)
    both = MeasuredProfile.from_rows(pd.DataFrame(copy + fresh), fallback="aurora").memop(op)
    assert both.seconds == pytest.approx(0.059, rel=1e-9)  # one call; the step's count multiplies it
    assert both.source == "measured (α–β fit of copy_fresh over 7.5e+07–1.5e+08 B)"
    warm = MeasuredProfile.from_rows(pd.DataFrame(copy), fallback="aurora").memop(op)
    assert warm.seconds == pytest.approx(0.010 * 150_000_000 / (1 << 27), rel=1e-9)
    assert warm.source.startswith("extrapolated (α–β fit of copy (copy_fresh not measured: priced as a copy "
                                  "into a used buffer, without the first touch of a new one)")


def test_a_tp_overlap_figure_does_not_hide_blocking_allreduces():
    df = pd.DataFrame([{"kind": "overlap", "op": "overlap", "axis": "tp", "status": "ok",
                        "time_us": 1.0, "extra": {"exposed_fraction": 0.1}}])
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    assert prof.overlap("tp").seconds == 1.0 == prof.fallback.spec["overlap"]["tp"]
    assert prof.sources()["overlap.tp"] == "specified (analysis/systems/aurora.yaml: overlap.tp)"


def test_rows_from_two_devices_are_refused():
    df = pd.DataFrame([{"kind": "gemm", "op": "qkv", "phase": "fwd", "m": 8, "n": 8, "k": 8,
                        "dtype": "bf16", "time_us": 1.0, "status": "ok", "run_device": d}
                       for d in ("cuda", "xpu")])
    with pytest.raises(ValueError, match="different devices"):
        MeasuredProfile.from_rows(df, fallback="aurora")
