"""Step-time predictor: hand-computed cases, properties, workload as the only shape source, CLI."""
import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

import microbench.workload as wl
from analysis import formulas
from analysis.predict import COMPONENTS, main, predict, seed_model
from analysis.profile import SpecProfile, SystemProfile
from microbench.config import preset, with_layout


class GemmOnly(SystemProfile):
    """Every GEMM at exactly 1 TFLOP/s, everything else free: hand-computable."""
    name, peak_tflops, ranks_per_node, device_memory_gib = "gemm-only", 1.0, 8, 1e6

    def __init__(self, comm_s: float = 0.0, exposed: float = 1.0):
        self.comm_s, self.exposed = comm_s, exposed

    def gemm_time_s(self, gemm): return gemm.flop / 1e12
    def attention_time_s(self, att): return 0.0
    def memop_time_s(self, op): return 0.0
    def bytes_time_s(self, nbytes, *, op="copy"): return 0.0
    def collective_time_s(self, coll, *, crosses_nodes, num_groups=1, ranks_per_node_in_group=None):
        return self.comm_s
    def p2p_time_s(self, coll, *, crosses_nodes): return self.comm_s
    def overlap(self, kind): return self.exposed if kind == "dp" else 1.0
    attention_fused = True
    def layer_overhead_time_s(self): return 0.0
    def sources(self): return {"peak": self.SRC, "memory": self.SRC}
    SRC = "specified (test: GemmOnly)"
    def gemm_source(self, gemm): return self.SRC
    def attention_source(self, att): return self.SRC
    def bytes_source(self, *, op="copy", nbytes=None): return self.SRC
    def collective_source(self, coll, *, crosses_nodes, num_groups=1, ranks_per_node_in_group=None): return self.SRC
    def p2p_source(self, *, crosses_nodes, coll=None): return self.SRC
    def overlap_source(self, kind): return self.SRC
    def layer_overhead_source(self): return self.SRC


def test_one_stage_no_comm_is_microbatches_times_gemm_time():
    cfg = preset("tiny")  # L 4, d 128, f 512 gated, s 128, mbs 2 → T 256, V 512, gbs 8 → m 4
    T, d, f, V, L, m = 256, 128, 512, 512, 4, 4
    layer = 3 * 2 * T * (d * 3 * d + d * d + d * 2 * f + f * d)  # fwd, dgrad, wgrad of 4 linears
    head = 3 * 2 * T * d * V
    assert layer == 402_653_184 and head == 100_663_296
    pr = predict(cfg, GemmOnly())
    assert pr.step_time_s == pytest.approx(m * (L * layer + head) / 1e12, rel=1e-12)
    assert pr.breakdown_s["bubble"] == 0 and pr.breakdown_s["tp_comm"] == 0


def test_bubble_formula_and_schedule():
    assert formulas.bubble_fraction(pp=4, num_microbatches=8) == 3 / 8
    assert formulas.bubble_fraction(pp=4, num_microbatches=8, interleave=2) == 3 / 16
    cfg = with_layout(preset("tiny"), pp=2, micro_batch=1, global_batch=8)
    pr = predict(cfg, GemmOnly())
    stage = pr.stage_fwd_s + pr.stage_bwd_s   # the last stage: its layers and the LM head
    head = 3 * 2 * 128 * 128 * 512 / 1e12      # fwd, dgrad, wgrad of [T=128, d=128] x [d, V=512]
    # 1F1B: m micro-batches at the bottleneck's pace, and the fill/drain through the other
    # p − 1 stages, which carry the layers but not the LM head (nothing else is priced here)
    assert pr.breakdown_s["bubble"] == pytest.approx(1 * (stage - head))
    assert pr.step_time_s == pytest.approx(8 * stage + (stage - head))
    iv = predict(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, interleave=2)), GemmOnly())
    assert iv.breakdown_s["bubble"] == pytest.approx(stage / 2)           # (p − 1)/v·(t_f + t_b)


def test_fom_alcf_1t_by_hand():
    # (6·2048·24576² + 2048²·24576)·512·128 multiply-adds per step
    assert formulas.fom(preset("alcf-1t"), 1.0) == pytest.approx(493_144_159_197_069_312, rel=1e-15)
    assert formulas.fom(preset("alcf-1t"), 100.0) == pytest.approx(4.93144159197069312e15, rel=1e-15)


def test_megatron_tflops_known_config():
    cfg = preset("gpt3-175b")  # 4h MLP, no GQA: equals Narayanan et al. eq. 3 with factor 3
    B, s, L, h, V = 1536, 2048, 96, 12288, 51200
    narayanan = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert formulas.megatron_flop(cfg) == pytest.approx(narayanan, rel=1e-12)
    assert formulas.megatron_tflops(cfg, 10.0) == pytest.approx(narayanan / 10 / 1e12 / 1024, rel=1e-12)


def test_seed_model_formula():
    cfg = preset("alcf-1t")
    s, d, L, b = 2048, 24576, 128, 512
    t = formulas.seed_step_time(cfg, alpha=1e-14, beta=1e-10)
    assert t == pytest.approx(1e-14 * b * L * (36 * s * d * d + 6 * s * s * d) / (64 * 12) + 1e-10 * 4 * b * L * s * d / 64)
    # α from GEMMs at exactly 1 TFLOP/s: 2 s per 1e12 FLOP = 2e-12 s per multiply-add; β: one
    # TP allreduce of [2048, 24576] (1 ms here) per element (the formula counts 4 per layer)
    sm = seed_model(cfg, GemmOnly(comm_s=1e-3))
    assert sm["alpha"] == pytest.approx(2e-12, rel=1e-12)
    assert sm["beta"] == pytest.approx(1e-3 / (2048 * 24576), rel=1e-12)


layouts = st.sampled_from([dict(tp=1, pp=1, dp=1), dict(tp=2, pp=2, dp=2), dict(tp=4, pp=1, dp=2),
                           dict(tp=1, pp=4, dp=1), dict(tp=2, pp=1, dp=4)])
systems = st.sampled_from(["dgx-a100-80gb", "dgx-h100", "aurora", "polaris"])


def _cfg(layout, mbs, m, recompute="none", sp=False, zero=0):
    base = preset("llama2-7b")
    return with_layout(base, **layout, micro_batch=mbs, global_batch=mbs * layout["dp"] * m,
                       recompute=recompute, sequence_parallel=sp and layout["tp"] > 1,
                       zero_stage=zero if layout["dp"] > 1 else 0)


@settings(max_examples=15, deadline=None)
@given(layout=layouts, system=systems, m=st.integers(1, 16), rc=st.sampled_from(["none", "selective", "full"]),
       sp=st.booleans(), zero=st.sampled_from([0, 1, 3]))
def test_components_non_negative_and_sum_to_step(layout, system, m, rc, sp, zero):
    pr = predict(_cfg(layout, 1, m, rc, sp, zero), SpecProfile.from_yaml(system))
    assert set(pr.breakdown_s) == set(COMPONENTS)
    assert all(v >= 0 for v in pr.breakdown_s.values())
    assert sum(pr.breakdown_s.values()) == pytest.approx(pr.step_time_s, rel=1e-12)
    d = json.loads(json.dumps(pr.to_dict()))
    for key in ("step_time_s", "breakdown_s", "fom", "model_tflops_per_device", "mfu", "tokens_per_s",
                "memory_gib_per_device", "seed_model", "sources"):
        assert key in d


@settings(max_examples=15, deadline=None)
@given(layout=layouts, system=systems, m=st.integers(1, 32))
def test_more_microbatches_never_raise_bubble_fraction(layout, system, m):
    prof = SpecProfile.from_yaml(system)
    a, b = predict(_cfg(layout, 1, m), prof), predict(_cfg(layout, 1, m + 1), prof)
    assert b.bubble_fraction <= a.bubble_fraction
    assert b.breakdown_s["bubble"] / b.step_time_s <= a.breakdown_s["bubble"] / a.step_time_s + 1e-12


@settings(max_examples=15, deadline=None)
@given(layout=layouts, system=systems, m=st.integers(1, 8), zero=st.sampled_from([0, 1, 3]),
       exposed=st.floats(0, 1))
def test_overlap_never_raises_step(layout, system, m, zero, exposed):
    cfg = _cfg(layout, 1, m, zero=zero)
    prof = SpecProfile.from_yaml(system)
    assert predict(cfg, prof).step_time_s <= predict(cfg, prof, dp_overlap=False).step_time_s
    fake = GemmOnly(comm_s=0.01, exposed=exposed)
    assert predict(cfg, fake).step_time_s <= predict(cfg, fake, dp_overlap=False).step_time_s
    assert predict(cfg, fake).step_time_s <= predict(cfg, GemmOnly(comm_s=0.01, exposed=1.0)).step_time_s


def test_shapes_come_only_from_the_workload(monkeypatch):
    cfg = preset("tiny")
    base = predict(cfg, GemmOnly()).step_time_s
    real = wl.workload

    def doubled(c, **kw):
        w = real(c, **kw)
        return dataclasses.replace(w, gemms=tuple(dataclasses.replace(g, k=2 * g.k) for g in w.gemms))

    monkeypatch.setattr(wl, "workload", doubled)
    changed = predict(cfg, GemmOnly()).step_time_s
    layer_gemm = 4 * sum(g.flop for g in real(cfg).gemms) * 4 / 1e12  # m 4, L 4
    assert changed == pytest.approx(base + layer_gemm)
    monkeypatch.setattr(wl, "memory_bytes", lambda c, **kw: {"weights": 2 ** 40, "gradients": 0,
                                                              "optimizer": 0, "activations": 0})
    pr = predict(cfg, GemmOnly())
    assert pr.memory_gib_per_device["weights"] == 1024.0


def test_memory_flag():
    pr = predict(preset("alcf-1t"), SpecProfile.from_yaml("aurora"))
    assert pr.fits_in_memory
    tight = with_layout(preset("alcf-1t"), tp=1, pp=1, dp=768, micro_batch=1, global_batch=768)
    assert not predict(tight, SpecProfile.from_yaml("aurora")).fits_in_memory


def test_cli_json_alcf_1t_aurora(capsys):
    assert main(["--model", "alcf-1t", "--system", "aurora", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 768
    assert d["step_time_s"] == pytest.approx(sum(d["breakdown_s"].values()), rel=1e-12)
    assert sum(d["seconds_by_provenance"].values()) == pytest.approx(d["step_time_s"], rel=1e-9)
    assert d["seconds_by_provenance"]["specified"] == pytest.approx(d["step_time_s"], rel=1e-9)  # spec only
    assert set(d["seed_model"]) >= {"alpha", "beta", "step_time_s"}
    assert d["fom"] == pytest.approx(formulas.fom(preset("alcf-1t"), d["step_time_s"]))
    assert main(["--model", "alcf-1t", "--system", "aurora"]) == 0
    out = capsys.readouterr().out
    assert "bubble" in out and "tp_comm" in out and "MFU" in out
    assert "by provenance                    measured 0 s (0.0%), extrapolated 0 s (0.0%), specified" in out
    assert "  pp_p2p         specified (analysis/systems/aurora.yaml: network.inter.nic_gbps" in out


def test_cli_explicit_dims(capsys):
    argv = ["--layers", "4", "--hidden", "256", "--heads", "8", "--ffn", "1024", "--seq", "512",
            "--vocab", "1024", "--tp", "2", "--pp", "2", "--dp", "2", "--mbs", "1", "--gbs", "8",
            "--recompute", "selective", "--sequence-parallel", "--zero", "1", "--system", "dgx-h100", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parallel"]["sequence_parallel"] and d["model"]["hidden"] == 256


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nope", "--system", "aurora"], "unknown model preset 'nope'; known: alcf-1t"),
    (["--model", "tiny", "--system", "nope"], "unknown system 'nope'; shipped: aurora"),
    (["--model", "alcf-1t", "--system", "aurora", "--tp", "5"], "num_heads(192) % tp(5)"),
    (["--hidden", "128", "--system", "aurora"], "--layers"),
    (["--model", "tiny"], "--system"),
    (["--model", "tiny", "--system", "aurora", "--profile", "/nonexistent"], "/nonexistent"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err and err.count("\n") == 1


def test_zero2_reduces_gradients_every_micro_batch():
    from analysis.profile import SpecProfile
    from microbench.config import preset, with_layout
    prof = SpecProfile.from_yaml("aurora")
    base = with_layout(preset("alcf-1t"), tp=12, pp=8, dp=8, global_batch=64)
    z1 = predict(with_layout(base, zero_stage=1), prof, dp_overlap=False).breakdown_s["dp_sync"]
    z2 = predict(with_layout(base, zero_stage=2), prof, dp_overlap=False).breakdown_s["dp_sync"]
    m = base.parallel.num_microbatches
    assert m > 1 and z2 > z1  # the reduce-scatter m times instead of once


def test_a_measured_framework_term_replaces_the_profiles_per_layer_overhead():
    """The A100 profile carries a fitted per-layer overhead; a measured framework term is the
    same time measured, so the two are never added."""
    from analysis.predict import FrameworkTerms
    cfg = with_layout(preset("tiny"), pp=2, global_batch=8)
    prof = SpecProfile.from_yaml("dgx-a100-80gb")
    term = FrameworkTerms(per_layer_microbatch_s=1e-3, source="measured (test)")
    base = predict(cfg, prof)
    fw = predict(cfg, prof, framework=term)
    assert base.breakdown_s["overhead"] > 0
    assert fw.breakdown_s["overhead"] == 0 and fw.breakdown_s["framework"] > 0
    none = prof.with_knobs({"efficiency.layer_overhead_us": 0.0})
    assert fw.step_time_s == pytest.approx(predict(cfg, none, framework=term).step_time_s, rel=1e-12)
