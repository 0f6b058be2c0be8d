"""The main job: one world, one run directory, every probe, a prediction naming its sources."""
import json
import subprocess
import sys

import pytest

from analysis import load
from microbench.harness.campaign import parser, plan, validate
from microbench.harness.scale import auto_scale
from microbench.model.config import alcf_1t, tiny
from microbench.runtime.results import read_run
from tests.launch import REPO, env, run_local


def args_for(*argv):
    a = parser().parse_args([*argv, "--scale", "0.0625"] if "--scale" not in argv else list(argv))
    validate(a)
    return a


def test_plan_covers_every_component_of_a_step():
    steps = plan(args_for("--model", "tiny"), 2, "cpu")
    names = {s.module.split(".")[-1] for s in steps}
    assert names == {"gemm", "attention", "layer_ops", "allreduce", "allgather", "reduce_scatter",
                     "sendrecv", "dp_allreduce", "overlap", "host"}


def test_the_host_step_measures_the_tp_call_at_the_models_tp():
    """The main job's host probe gets the model's TP, so with more than one rank it also times
    the host's TP call (microbench.host caps the group at the world: 2 of alcf-1t's 12 here)."""
    host = next(s for s in plan(args_for("--model", "alcf-1t"), 2, "cpu") if s.module.endswith(".host"))
    assert host.argv[host.argv.index("--tp") + 1] == "12"


def test_a_single_rank_world_plans_compute_and_host_only():
    names = {s.module.split(".")[-1] for s in plan(args_for("--model", "tiny"), 1, "cpu")}
    assert names == {"gemm", "attention", "layer_ops", "host"}


def test_only_and_skip_filter_the_plan():
    steps = plan(args_for("--model", "tiny", "--only", "gemm,allreduce"), 2, "cpu")
    assert {s.module for s in steps} == {"microbench.gemm", "microbench.allreduce"}
    steps = plan(args_for("--model", "tiny", "--skip", "overlap"), 2, "cpu")
    assert "microbench.overlap" not in {s.module for s in steps}


# alcf-1t at TP 12: the largest GEMM is the gated FC1, T 2048 × out 2·98,304/12 × in 24,576
FC1_FLOP = 2 * 2048 * 16384 * 24576
assert FC1_FLOP == 1_649_267_441_664


def test_the_largest_1t_gemm_is_the_hand_computed_fc1():
    from microbench.model.workload import workload
    w = workload(alcf_1t())
    assert max(g.flop for g in w.gemms + w.head_gemms) == FC1_FLOP


@pytest.mark.parametrize("rate_flops, scale", [
    (FC1_FLOP / 64 / 0.1, 0.25),   # budget exactly FC1/64: (1/4)³ fits, (1/2)³ does not
    (4e10, 0.125),                 # an fp32-speed core: 4e9 FLOP per 0.1 s → 1/8 (FC1/512 = 3.2e9)
    (1.3e9, 0.03125),              # bf16 on an AVX2 core: 1.3e8 FLOP per 0.1 s → 1/32 (FC1/32768 = 5.0e7)
])
def test_cpu_scale_follows_the_measured_rate(rate_flops, scale):
    s, why = auto_scale(alcf_1t(), device_kind="cpu", quick=False, rate_flops=rate_flops)
    assert s == scale
    assert f"{rate_flops / 1e9:.3g} GFLOP/s" in why
    # attention keeps one of the 16 heads per rank: never below 1/16
    assert ("attention at 0.0625" in why) == (scale < 0.0625)


def test_the_attention_probe_keeps_a_head_while_gemms_go_smaller():
    a = args_for("--model", "alcf-1t", "--scale", "0.03125")
    steps = {s.module: list(s.argv) for s in plan(a, 2, "cpu")}
    gemm, att = steps["microbench.gemm"], steps["microbench.attention"]
    assert gemm[gemm.index("--scale") + 1] == "0.03125"
    assert att[len(att) - 1 - att[::-1].index("--scale") + 1] == "0.0625"  # the last --scale wins


def test_gpu_scale_is_one_and_a_cpu_needs_a_rate():
    assert auto_scale(alcf_1t(), device_kind="cuda", quick=False)[0] == 1.0
    with pytest.raises(ValueError, match="measured GEMM rate"):
        auto_scale(alcf_1t(), device_kind="cpu", quick=False)
    assert auto_scale(tiny(), device_kind="cpu", quick=False, rate_flops=1e9)[0] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt9"], "unknown preset; known: alcf-1t"),
    (["--only", "gemms"], "--only 'gemms': unknown probe"),
    (["--scale", "2"], "--scale 2: must be in (0, 1]"),
    (["--system", "frontier"], "--system: unknown system 'frontier'"),
    (["-n", "0"], "-n/--iters 0"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message):
    res = subprocess.run([sys.executable, "-m", "microbench", *argv], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.multirank
def test_quick_campaign_on_the_embedded_world(tmp_path):
    out = tmp_path / "run"
    res = run_local("microbench", "--model", "tiny", "--quick", "--out", str(out), ranks=2, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    man, rows = read_run(out)
    assert man["status"] == "ok" and man["world_size"] == 2 and man["peak_tflops"]
    df = load(out)
    probes = set(df.probe)
    assert {"gemm", "attention", "layer_ops", "allreduce", "sendrecv"} <= probes
    ok = df[df.status == "ok"]
    assert (ok.num_wrong.fillna(0) == 0).all()
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["sources"]["gemm"] == "measured"  # tiny at scale 1: every GEMM at its own shape
    words = pred["seconds_by_provenance"]
    assert sum(words.values()) == pytest.approx(pred["step_time_s"], rel=1e-9)
    assert "#   of the step   : measured" in res.stdout
    assert man["compute_scale"]["value"] == 1.0 and "GFLOP/s" in man["compute_scale"]["why"]


@pytest.mark.parametrize("world, tp, pp", [(2, 2, 2), (12, 12, 4), (24, 12, 8), (768, 12, 128)])
def test_group_sizes_fit_the_model_and_the_node(world, tp, pp):
    from microbench.harness.campaign import axis_size, check_steps
    cfg = alcf_1t()
    assert axis_size(cfg, "tp", world, cap=12) == tp  # TP inside a 12-tile node, heads % tp == 0
    assert axis_size(cfg, "pp", world) == pp          # 128 layers % pp == 0
    check_steps(plan(args_for("--model", "alcf-1t"), world, "cpu", ranks_per_node=12), world)


@pytest.mark.parametrize("rate_flops, quick, n", [
    (0.659e9, False, 512),   # bf16 on an AVX2 core: 2·512³ = 2.7e8 FLOP ≤ 0.66e9·1 s < 2·1024³
    (4e10, False, 2048),     # fp32 speed: 2·2048³ = 1.7e10 ≤ 4e10
    (0.659e9, True, 256),    # --quick: ¼ s → 1.6e8 < 2·512³
    (1e3, False, 256),       # never below 256
])
def test_cpu_peak_gemm_size_follows_the_measured_rate(rate_flops, quick, n):
    from microbench.harness.scale import auto_peak_size
    assert auto_peak_size(rate_flops=rate_flops, quick=quick) == n


def test_plan_passes_the_scale_and_peak_size_to_the_compute_probes():
    a = args_for("--model", "tiny", "--scale", "0.5", "--peak-size", "512")
    gemm = next(s for s in plan(a, 2, "cpu") if s.module == "microbench.gemm")
    argv = list(gemm.argv)
    assert argv[argv.index("--scale") + 1] == "0.5" and argv[argv.index("--peak-size") + 1] == "512"
