"""Step-time predictor: hand-computed cases, properties, workload as the only shape source, CLI."""
import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

import microbench.model.workload as wl
import microbench.model.memory as mem
from analysis import formulas
from analysis.predict import COMPONENTS, main, predict, seed_model
from analysis.spec import SpecProfile
from analysis.system import Priced, SystemProfile, WithHost
from microbench.model.config import preset, with_layout
from microbench.model.metrics import megatron_lm_flop, megatron_tflops


class GemmOnly(SystemProfile):
    """Every GEMM at exactly 1 TFLOP/s, everything else free: hand-computable. ``host_s``: the
    host's time per layer per micro-batch by phase; ``asynchronous``: how it composes."""
    name, peak_tflops, ranks_per_node, device_memory_gib, nodes = "gemm-only", 1.0, 8, 1e6, None
    SRC = "specified (test: GemmOnly)"
    attention_fused = True

    def __init__(self, comm_s: float = 0.0, exposed: float = 1.0, host_s: dict | None = None,
                 asynchronous: bool = True):
        self.comm_s, self.exposed, self.host_s, self.asynchronous = comm_s, exposed, host_s or {}, asynchronous

    def gemm(self, gemm): return Priced(gemm.flop / 1e12, self.SRC)
    def attention(self, att): return Priced(0.0, self.SRC)
    def memop(self, op): return Priced(0.0, self.SRC)
    def collective(self, coll, placement): return Priced(self.comm_s, self.SRC)
    def p2p(self, coll, placement): return Priced(self.comm_s, self.SRC)
    def host(self, h): return Priced(self.host_s.get(h.phase if h.name == "layer" else h.name, 0.0), self.SRC)
    def tp_sync(self, op): return Priced(0.0, self.SRC)
    def overlap(self, kind): return Priced(self.exposed if kind == "dp" else 1.0, self.SRC)
    def sources(self): return {"peak": self.SRC, "memory": self.SRC}


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


class SharedHost(GemmOnly):
    def __init__(self, sigma):
        super().__init__()
        self.host_sharing = (sigma, "specified (test: SharedHost)")


def test_ranks_sharing_a_hosts_cores_run_the_fill_and_drain_on_the_idle_stages_cores():
    cfg = with_layout(preset("tiny"), pp=2, micro_batch=1, global_batch=8)  # m 8, 2 layers a stage
    # a layer 6·128·(128·384 + 128² + 128·1024 + 512·128) = 201,326,592 flop; the LM head
    # 6·128·128·512 = 50,331,648: the last stage 452,984,832, the other 402,653,184 (1 TFLOP/s)
    last, other = 452_984_832e-12, 402_653_184e-12
    assert predict(cfg, GemmOnly()).step_time_s == pytest.approx(8 * last + other, rel=1e-12)
    # σ = 2 (4 ranks on 2 cores): the critical path at a core's pace, (8·last + other)/2 =
    # 2.013 ms, is below the work over the cores, 8·last = 3.624 ms: no bubble left
    two = predict(cfg, SharedHost(2.0))
    assert two.breakdown_s["bubble"] == 0 and two.step_time_s == pytest.approx(3.623878656e-3, rel=1e-12)
    assert any(n.startswith("host sharing σ = 2, specified (test: SharedHost)") for n in two.notes)
    # σ = 1.05: the critical path, 4.02653184 ms / 1.05 = 3.834792 ms, is the longer bound
    near = predict(cfg, SharedHost(1.05))
    assert near.step_time_s == pytest.approx(3.8347922286e-3, rel=1e-9)
    assert near.breakdown_s["bubble"] == pytest.approx(2.109135726e-4, rel=1e-8)
    # one stage has no fill or drain: nothing changes
    flat = with_layout(preset("tiny"), micro_batch=1, global_batch=8)
    assert predict(flat, SharedHost(2.0)).step_time_s == predict(flat, GemmOnly()).step_time_s


def test_fom_alcf_1t_by_hand():
    # (6·2048·24576² + 2048²·24576)·512·128 multiply-adds per step
    assert formulas.fom(preset("alcf-1t"), 1.0) == pytest.approx(493_144_159_197_069_312, rel=1e-15)
    assert formulas.fom(preset("alcf-1t"), 100.0) == pytest.approx(4.93144159197069312e15, rel=1e-15)


def test_megatron_tflops_known_config():
    cfg = preset("gpt3-175b")  # 4h MLP, no GQA: equals Narayanan et al. eq. 3 with factor 3
    B, s, L, h, V = 1536, 2048, 96, 12288, 51200
    narayanan = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert megatron_lm_flop(cfg) == pytest.approx(narayanan, rel=1e-12)
    assert megatron_tflops(cfg, 10.0) == pytest.approx(narayanan / 10 / 1e12 / 1024, rel=1e-12)


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
    monkeypatch.setattr(mem, "memory_bytes", lambda c, **kw: {"weights": 2 ** 40, "gradients": 0,
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
    (["--model", "nope", "--system", "aurora"], "--model 'nope': unknown preset; known: alcf-1t"),
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
    base = with_layout(preset("alcf-1t"), tp=12, pp=8, dp=8, global_batch=64)
    assert base.parallel.num_microbatches == 8  # 64 / (mbs 1 × dp 8)
    ms = 1e-3  # every collective 1 ms, nothing hidden (dp_overlap off)
    z1 = predict(with_layout(base, zero_stage=1), GemmOnly(comm_s=ms), dp_overlap=False).breakdown_s["dp_sync"]
    z2 = predict(with_layout(base, zero_stage=2), GemmOnly(comm_s=ms), dp_overlap=False).breakdown_s["dp_sync"]
    assert z1 == pytest.approx(2 * ms, rel=1e-12)  # ZeRO-1: the reduce-scatter once, then the allgather
    assert z2 == pytest.approx(9 * ms, rel=1e-12)  # ZeRO-2: the reduce-scatter in each of 8 micro-batches


# tiny (L 4, d 128, f 512 gated, s 128, mbs 2 → T 256, V 512; gbs 8 → m 4) on one stage at
# 1 TFLOP/s: per layer, forward 2·T·(3d² + d² + 2df + fd) FLOP, backward twice that; the LM
# head 2·T·d·V forward, twice that backward.
LAYER_FWD_S = 2 * 256 * (3 * 128 * 128 + 128 * 128 + 2 * 128 * 512 + 512 * 128) / 1e12
HEAD_FWD_S = 2 * 256 * 128 * 512 / 1e12


def test_a_host_bound_layer_costs_its_host_time_on_an_asynchronous_device():
    """Host 1 ms (fwd) and 2 ms (bwd) per layer, kernels of 134 µs and 268 µs: the device idles,
    a micro-batch costs the host's 4 × (1 + 2) ms, and the host time the device does not hide is
    the framework component."""
    assert LAYER_FWD_S == pytest.approx(134.217728e-6, rel=1e-12)
    pr = predict(preset("tiny"), GemmOnly(host_s={"fwd": 1e-3, "bwd": 2e-3}))
    assert pr.step_time_s == pytest.approx(4 * 4 * (1e-3 + 2e-3), rel=1e-12)
    device = 4 * (4 * 3 * LAYER_FWD_S + 3 * HEAD_FWD_S)
    assert pr.breakdown_s["framework"] == pytest.approx(4 * 4 * 3e-3 - device, rel=1e-12)
    assert pr.phases["fwd"]["bound"] == "host" and pr.phases["bwd"]["bound"] == "host"
    assert pr.phases["fwd"]["host_s"] == pytest.approx(4e-3) and pr.phases["bwd"]["device_s"] == pytest.approx(
        4 * 2 * LAYER_FWD_S + 2 * HEAD_FWD_S)


def test_each_tp_collective_call_adds_its_host_time_in_its_phase():
    """TP 2, full recompute: Megatron's 2 TP allreduces per layer in each of fwd, recompute and
    bwd; host 1 ms a layer per phase and 100 µs a call: 1.2 ms a phase, host-bound on an
    asynchronous device — a micro-batch costs 4 layers × 3 phases × 1.2 ms; at TP 1 no call."""
    tp2 = with_layout(preset("tiny"), tp=2, dp=1, pp=1, recompute="full", global_batch=2)
    host = {"fwd": 1e-3, "recompute": 1e-3, "bwd": 1e-3, "tp_call": 100e-6}
    pr = predict(tp2, GemmOnly(host_s=host))
    assert tp2.parallel.num_microbatches == 1
    assert {ph: v["host_s"] for ph, v in pr.phases.items()} == pytest.approx(
        {"fwd": 4 * 1.2e-3, "recompute": 4 * 1.2e-3, "bwd": 4 * 1.2e-3}, rel=1e-12)
    assert pr.step_time_s == pytest.approx(4 * 3 * 1.2e-3, rel=1e-12)
    tp1 = predict(with_layout(tp2, tp=1), GemmOnly(host_s=host))
    assert tp1.phases["fwd"]["host_s"] == pytest.approx(4 * 1e-3, rel=1e-12)


def test_a_device_bound_layer_hides_its_host_time():
    """Host 10 µs per layer and phase, kernels of 134 µs and more: the step is the device's."""
    pr = predict(preset("tiny"), GemmOnly(host_s={"fwd": 10e-6, "bwd": 10e-6}))
    assert pr.step_time_s == pytest.approx(4 * (4 * 3 * LAYER_FWD_S + 3 * HEAD_FWD_S), rel=1e-12)
    assert pr.breakdown_s["framework"] == 0.0 and pr.phases["bwd"]["bound"] == "device"


def test_on_a_synchronous_device_host_and_device_add():
    pr = predict(preset("tiny"), GemmOnly(host_s={"fwd": 10e-6, "bwd": 10e-6}, asynchronous=False))
    assert pr.step_time_s == pytest.approx(4 * (4 * 3 * LAYER_FWD_S + 3 * HEAD_FWD_S) + 4 * 4 * 20e-6, rel=1e-12)
    assert pr.breakdown_s["framework"] == pytest.approx(4 * 4 * 20e-6, rel=1e-12)


def test_a_host_term_measured_apart_replaces_the_profiles():
    """The Megatron cross-check's narrowed run measures the framework's host time: it replaces
    the profile's, it is never added to it."""
    cfg = with_layout(preset("tiny"), pp=2, global_batch=8)  # 2 layers a stage, 4 micro-batches
    base = GemmOnly(host_s={"fwd": 5e-3, "bwd": 5e-3}, asynchronous=False)
    pr = predict(cfg, WithHost(base, {"fwd": 1e-3, "bwd": 1e-3}, "measured (test)"))
    assert pr.breakdown_s["framework"] == pytest.approx(4 * 2 * 2e-3, rel=1e-12)
    assert pr.sources["framework"] == "measured (test)"


def test_the_cross_checks_host_term_is_one_component_that_scales_with_layers_and_microbatches():
    """The narrowed run's host time (``HostTerm``, per layer per micro-batch) is the whole
    ``framework`` component on a synchronous device, and doubling the micro-batches doubles it."""
    from analysis.crosscheck.megatron import HostTerm
    term = HostTerm(per_layer_microbatch_s=1e-3, source="measured (test)")
    base = GemmOnly(host_s={"fwd": 5e-3, "bwd": 5e-3}, asynchronous=False)
    small = with_layout(preset("tiny"), pp=2, global_batch=8)  # 2 layers a stage, 4 micro-batches
    big = with_layout(small, global_batch=16)                   # 8 micro-batches
    pr_small, pr_big = predict(small, term.profile(base, small)), predict(big, term.profile(base, big))
    assert pr_small.breakdown_s["framework"] == pytest.approx(2 * 4 * 1e-3, rel=1e-12)
    assert pr_big.breakdown_s["framework"] == pytest.approx(2 * pr_small.breakdown_s["framework"], rel=1e-12)
    assert term.step_s(small) == pytest.approx(pr_small.breakdown_s["framework"], rel=1e-12)


def test_the_megatron_cross_check_prices_the_attention_path_the_framework_runs():
    """Megatron-DeepSpeed runs flash attention only under a --use-flash-attn* flag, and the
    cross-check's runs pass none: it prices the explicit path (scores through memory, their
    softmax) whatever the spec says, and the source of every priced attention says why.
    (aurora.yaml says flash: priced so, the grid's seq-1024 configuration was 28 % short.)"""
    from analysis.crosscheck.megatron import FRAMEWORK_ATTENTION, framework_fallback
    from full_model.megatron.jobscript import JobOptions, megatron_args
    spec, fw = SpecProfile.from_yaml("aurora"), framework_fallback("aurora")
    assert spec.attention_fused and not fw.attention_fused
    cfg = with_layout(preset("mds-cpu"), dp=2, global_batch=preset("mds-cpu").parallel.global_batch)
    assert not [a for a in map(str, megatron_args(cfg, opts=JobOptions(nodes=1, ranks_per_node=2)))
                if a.startswith("--use-flash-attn")]
    flash, explicit = predict(cfg, spec), predict(cfg, fw)
    assert FRAMEWORK_ATTENTION in explicit.sources["attention"]
    assert FRAMEWORK_ATTENTION not in flash.sources["attention"]
    # the explicit path's softmax over the scores is priced; the flash path has none
    assert explicit.breakdown_s["memops"] > flash.breakdown_s["memops"]
    assert explicit.breakdown_s["attention"] > flash.breakdown_s["attention"]
