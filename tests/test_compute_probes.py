"""Compute probes: alcf-1t TP12 shapes and FLOPs by hand, float64 checks, scale, bad inputs, real runs."""
from __future__ import annotations

import argparse
import json
import re
import os

import pytest

from microbench.attention import AttentionCore, PATHS, attention_shapes, attention_work
from microbench.harness.compute import scale_dim
from microbench.model.devices import spec_peak
from microbench.model.config import tiny, with_layout
from microbench.gemm import Gemm, gemm_shapes, gemm_work
from microbench.harness.engine import run_probe
from microbench.harness.modelargs import config_from_args
from microbench.layer_ops import LayerOps, adamw_shape, adamw_work, fresh_copy_work, memop_shapes, memop_work

from tests.launch import have_mpi, run_local, run_mpi


def cli_cfg(*argv: str):
    """The layout exactly as the compute probes' command line builds it."""
    ns = argparse.Namespace(model=None, tp=None, pp=None, dp=None, mbs=None)
    it = iter(argv)
    for flag in it:
        setattr(ns, flag.lstrip("-"), next(it) if flag == "--model" else int(next(it)))
    return config_from_args(ns, layout="world")


ALCF = cli_cfg("--model", "alcf-1t", "--tp", "12")
# Hand numbers, alcf-1t at TP 12: T = 1·2048, d = 24,576, QKV out 3d/12 = 6,144, attention
# projection in d/12 = 2,048, FC1 out (gate+up) 2·98,304/12 = 16,384, FC2 in 98,304/12 = 8,192,
# LM head out 32,256/12 = 2,688.
HAND_GEMMS = {
    ("qkv", "fwd"): (2048, 6144, 24576), ("qkv", "dgrad"): (2048, 24576, 6144),
    ("qkv", "wgrad"): (6144, 24576, 2048),
    ("attn_proj", "fwd"): (2048, 24576, 2048), ("attn_proj", "dgrad"): (2048, 2048, 24576),
    ("attn_proj", "wgrad"): (24576, 2048, 2048),
    ("fc1", "fwd"): (2048, 16384, 24576), ("fc1", "dgrad"): (2048, 24576, 16384),
    ("fc1", "wgrad"): (16384, 24576, 2048),
    ("fc2", "fwd"): (2048, 24576, 8192), ("fc2", "dgrad"): (2048, 8192, 24576),
    ("fc2", "wgrad"): (24576, 8192, 2048),
    ("lm_head", "fwd"): (2048, 2688, 24576), ("lm_head", "dgrad"): (2048, 24576, 2688),
    ("lm_head", "wgrad"): (2688, 24576, 2048),
}
HAND_FLOP = {"qkv": 618_475_290_624, "attn_proj": 206_158_430_208, "fc1": 1_649_267_441_664,
             "fc2": 824_633_720_832, "lm_head": 270_582_939_648}


def test_alcf_1t_tp12_gemm_shapes_and_flops():
    shapes = gemm_shapes(ALCF)
    assert {(g["op"], g["phase"]): (g["m"], g["n"], g["k"]) for g in shapes} == HAND_GEMMS
    for g in shapes:
        assert g["flop"] == HAND_FLOP[g["op"]] and g["dtype"] == "bf16" and g["batch"] == 1


def test_alcf_1t_tp12_attention_flops():
    a = {s["phase"]: s for s in attention_shapes(ALCF)}
    assert (a["fwd"]["batch"], a["fwd"]["heads"], a["fwd"]["seq"], a["fwd"]["head_dim"]) == (1, 16, 2048, 128)
    assert a["fwd"]["flop"] == 4 * 16 * 2048 ** 2 * 128 == 34_359_738_368
    assert a["bwd"]["flop"] == 68_719_476_736
    assert a["fwd"]["flop_causal"] == 17_179_869_184 and a["bwd"]["flop_causal"] == 34_359_738_368


def test_alcf_1t_tp12_memops_and_optimizer():
    got = {(s["op"], s["phase"]): (s["elements"], s["bytes_moved"]) for s in memop_shapes(ALCF)}
    td = 2048 * 24576  # 50,331,648 elements of [T, d], 2 bytes each
    # norm: fwd reads x, writes y; bwd reads x and dy, writes dx
    assert got[("norm", "fwd")] == (td, 2 * td * 2) and got[("norm", "bwd")] == (td, 3 * td * 2)
    assert got[("rotary", "fwd")] == (8_388_608, 33_554_432)          # T·(16+16 heads)·128
    assert got[("rotary", "bwd")] == (8_388_608, 33_554_432)          # the inverse rotation
    assert got[("swiglu", "fwd")] == (16_777_216, 100_663_296)        # T·8192, read 2 write 1
    assert got[("swiglu", "bwd")] == (16_777_216, 167_772_160)        # read 3 write 2
    assert got[("residual_add", "fwd")] == (td, 301_989_888)
    assert got[("residual_add", "bwd")] == (td, 301_989_888)          # the gradient sum: one add
    assert got[("softmax", "fwd")] == (67_108_864, 268_435_456)       # 16 heads · 2048²
    assert got[("softmax", "bwd")] == (67_108_864, 402_653_184)
    assert got[("cross_entropy", "fwd")] == (5_505_024, 44_040_192)   # T·2688 · (2+2+4) B
    assert got[("embedding", "fwd")] == got[("final_norm", "fwd")] == (td, 201_326_592)
    # 128 layers · (4d² + 3df)/12 + 2 norms of d, two vocab shards (embedding, head), final norm.
    layer = (4 * 24576 ** 2 + 3 * 24576 * 98304) // 12 + 2 * 24576
    params = 128 * layer + 2 * (32256 * 24576 // 12) + 24576
    assert params == 103_217_651_712
    a = adamw_shape(ALCF, max_params=1 << 20)
    assert a["params"] == params and a["bytes_step"] == params * 30  # 3·8 + 4 + 2 B/param
    assert a["measured_params"] == 1 << 20 and a["extrapolation"] == params / (1 << 20)
    zero = adamw_shape(cli_cfg("--model", "alcf-1t", "--tp", "12", "--pp", "64", "--dp", "2"),
                       max_params=1 << 20)
    assert zero["zero_stage"] == 1 and zero["params"] == (2 * layer + 32256 * 24576 // 12 + 24576) // 2  # last stage


def test_scale_shrinks_every_dim_and_keeps_multiples_of_8():
    by = {(g["op"], g["phase"]): g for g in gemm_shapes(ALCF, scale=0.25)}
    assert (by["qkv", "fwd"]["m"], by["qkv", "fwd"]["n"], by["qkv", "fwd"]["k"]) == (512, 1536, 6144)
    assert by["lm_head", "fwd"]["n"] == 672
    a = attention_shapes(ALCF, scale=0.25)[0]
    assert (a["heads"], a["seq"], a["head_dim"]) == (4, 512, 128)
    assert all(g["m"] % 8 == 0 for g in gemm_shapes(ALCF, scale=0.3))
    assert scale_dim(96, 0.25, "x", multiple=8) == 24 and scale_dim(100, 0.25, "x", multiple=8) == 25
    assert scale_dim(16, 0.25, "x", multiple=8) == 8 and scale_dim(3, 0.5, "x") == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_gemm_matches_float64(dtype):
    for g in gemm_shapes(tiny()):
        work = gemm_work({**g, "dtype": dtype}, seed=3, device="cpu")
        work.run()
        wrong, checked = work.check()
        assert wrong == 0 and checked > 0, (g, dtype)


def test_gemm_check_catches_a_wrong_result():
    g = gemm_shapes(tiny())[0]
    work = gemm_work(g, seed=3, device="cpu")
    work.run()
    work.output[0, :3] += 1.0  # three elements far outside any tolerance
    assert work.check()[0] == 3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_attention_matches_float64(dtype, path):
    for a in attention_shapes(tiny()):
        work = attention_work({**a, "dtype": dtype, "path": path}, seed=3, device="cpu")
        work.run()
        wrong, checked = work.check()
        assert wrong == 0 and checked > 0, (a["phase"], path, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layer_ops_and_adamw_match_float64(dtype):
    m = tiny().model
    for s in memop_shapes(tiny()) + memop_shapes(with_layout(tiny(), gated_mlp=False, norm="layernorm", dropout=True)):
        f = {**s, "dtype": dtype, "norm": "layernorm" if s["op"] == "gelu" else m.norm,
             "head_dim": m.head_dim, "vocab_shard": m.vocab_size}
        work = memop_work(f, seed=3, device="cpu")
        work.run()
        wrong, checked = work.check()
        assert wrong == 0 and checked > 0, (s["op"], s["phase"], dtype)
    work = adamw_work({**adamw_shape(tiny(), max_params=4096), "dtype": dtype}, seed=3, device="cpu")
    work.run()
    assert work.check() == (0, 2048)


def test_copy_fresh_cases_are_the_steps_buffer_sizes():
    """mds-cpu at seq 256, dp2: 18,878,976 gradient elements (the all_reduce a profiled
    Megatron-DeepSpeed run makes); ZeRO-1/2 also copy the rank's half into a new partition
    buffer, ZeRO-0 only flattens; a shard above the CPU cap is measured at 2^26 elements."""
    from microbench.layer_ops import fresh_copy_shapes
    from microbench.model.config import preset
    mds = with_layout(preset("mds-cpu"), seq_len=256, dp=2)
    for zero, sizes in ((0, [18_878_976]), (2, [18_878_976, 9_439_488])):
        shapes = fresh_copy_shapes(with_layout(mds, zero_stage=zero), device_kind="cpu")
        assert [s["elements"] for s in shapes] == sizes
        assert [s["bytes_moved"] for s in shapes] == [8 * n for n in sizes]  # fp32, read + write
    assert fresh_copy_shapes(with_layout(mds, dp=1), device_kind="cpu") == []
    big = fresh_copy_shapes(with_layout(preset("alcf-1t"), dp=2), device_kind="cpu")[0]
    assert big["elements"] == 1 << 26 and big["step_elements"] > 1 << 26
    work = fresh_copy_work({**fresh_copy_shapes(with_layout(tiny(), dp=2), device_kind="cpu")[0], "dtype": "bf16"},
                           seed=3, device="cpu")
    work.run()
    assert work.check() == (0, tiny().stage_params(0))


def test_spec_peaks():
    assert spec_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert spec_peak("Intel(R) Data Center GPU Max 1550", "bf16") == 298.0
    assert spec_peak("AMD EPYC", "bf16") is None


@pytest.mark.parametrize("probe,argv,message", [
    (Gemm(), ["--shape", "0,8,8"], "three positive integers"),
    (Gemm(), ["--shape", "8,8"], "three positive integers"),
    (Gemm(), ["--model", "tiny", "-d", "int8"], "-d/--dtype 'int8'"),
    (Gemm(), ["--model", "tiny", "--scale", "0.001"], "makes"),
    (Gemm(), ["--model", "tiny", "--scale", "0"], "must be in (0, 1]"),
    (Gemm(), ["--model", "tiny", "--scale", "2"], "must be in (0, 1]"),
    (Gemm(), ["--model", "alcf-1t", "--tp", "7"], "num_heads(192) % tp(7)"),
    (Gemm(), [], "needs --model"),
    (AttentionCore(), ["--model", "alcf-1t", "--tp", "12", "--scale", "0.01"], "heads per rank"),
    (LayerOps(), ["--model", "tiny", "--scale", "0.0001"], "makes"),
])
def test_bad_inputs_give_clear_errors(capsys, probe, argv, message):
    assert run_probe(probe, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {probe.module}:") and message in err, err


def _rows(out_dir):
    from analysis.load import load
    return load(str(out_dir))


@pytest.mark.multirank
@pytest.mark.parametrize("module,args", [
    # fp32: the same alcf-1t TP-12 shapes; bf16 matmul is ~40× slower on an AVX2-only CPU
    ("microbench.gemm", ["--model", "alcf-1t", "--tp", "12", "--scale", "0.0625", "-d", "fp32"]),
    ("microbench.attention", ["--model", "alcf-1t", "--tp", "12", "--scale", "0.125", "-d", "fp32"]),
    ("microbench.layer_ops", ["--model", "alcf-1t", "--tp", "12", "--scale", "0.0625",
                              "--adam-max-params", "1000000", "--copy-bytes", "16M", "-d", "fp32"]),
    ("microbench.peak", ["--model", "tiny", "--peak-size", "512", "--copy-bytes", "16M"]),
])
def test_two_rank_run(tmp_path, module, args):
    res = run_local(module, *args, "-n", "3", "-w", "1", "--out", str(tmp_path / "run"), ranks=2, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    df = _rows(tmp_path / "run")
    assert (df["status"] == "ok").all() and (df["num_wrong"] == 0).all()
    assert (df["world_size"] == 2).all() and "scale" in df and df["scale"].notna().all()
    assert (df["num_checked"] > 0).all()  # every case was checked
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    peak = df[df["op"] == "peak"]
    copy = df[df["op"] == "copy"]
    if module != "microbench.layer_ops":  # the manifest's denominator is this run's peak row
        assert manifest["peak_tflops"] == {peak["dtype"].iloc[0]: pytest.approx(peak["tflops"].iloc[0])}
        assert (df.loc[df["op"] != "peak", "scale"] < 1).all() or module.endswith("peak")
    if module != "microbench.gemm" and module != "microbench.attention":
        assert manifest["peak_gbps"] == pytest.approx(copy["gbps"].iloc[0])
    if module == "microbench.gemm":
        # the manifest says how the two ranks share the host's cores (placement.host_sharing)
        assert (df["run_ranks_per_node"] == 2).all() and (df["run_cpu_cores_usable"] == len(os.sched_getaffinity(0))).all()
        assert (df["run_threads_per_rank"] == max(1, os.cpu_count() // 2)).all()  # world.py's share
        ops = df[df["op"] != "peak"]
        assert len(ops) == 15 and set(ops["phase"]) == {"fwd", "dgrad", "wgrad"}
        assert (ops["dtype"] == "fp32").all()
        # % of peak is against the peak row measured in this run, not a stored figure
        assert ops["pct_peak"].values == pytest.approx(100 * ops["tflops"].values / peak["tflops"].iloc[0])
    if module == "microbench.layer_ops":
        adam = df[df["op"] == "adamw"].iloc[0]
        # 103,217,651,712 parameters (hand count above) × 0.0625 = 6,451,103,232, measured
        # on a 1,000,000-parameter chunk: the step is that time × 6,451.103232
        assert adam["params"] == 6_451_103_232 and adam["measured_params"] == 1_000_000
        assert adam["time_us_step"] == pytest.approx(adam["time_us"] * 6451.103232)


@pytest.mark.multirank
def test_concurrent_one_runs_rank_0_alone(tmp_path):
    res = run_local("microbench.gemm", "--shape", "64,64,64", "--concurrent", "one", "--no-peak",
                    "-n", "2", "-w", "1", "--out", str(tmp_path / "run"), ranks=2, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    df = _rows(tmp_path / "run")
    assert list(df["op"]) == ["custom"] and df["concurrent"].iloc[0] == "one"


@pytest.mark.multirank
@pytest.mark.mpi
@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py")
def test_gemm_under_mpiexec(tmp_path):
    res = run_mpi("microbench.gemm", "--model", "alcf-1t", "--tp", "12", "--scale", "0.0625",
                  "-d", "fp32", "-n", "2", "-w", "1", "--out", str(tmp_path / "run"), ranks=2, timeout=80)
    assert res.returncode == 0, res.stderr[-2000:]
    for op in ("qkv", "attn_proj", "fc1", "fc2", "lm_head"):
        assert all(f"{op:>9} {ph:>5}" in res.stdout for ph in ("fwd", "dgrad", "wgrad")), res.stdout


@pytest.mark.multirank
def test_benchmark_json_loads(tmp_path):
    import subprocess
    import sys
    from tests.launch import REPO, env
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "-q", "-p", "no:randomly",
                          "tests/test_bench_compute.py", "-k", "gemm and fwd or adamw",
                          f"--benchmark-json={out}"], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:]
    from analysis.load import load
    df = load(out)
    assert set(df["probe"]) == {"pytest-benchmark"} and len(df) == 6
    gemm = df[df["kind"] == "gemm"]
    assert gemm[["m", "n", "k", "flop"]].notna().all().all()
    assert (df["num_wrong"] == 0).all() and (df["num_checked"] > 0).all()  # the suite checks
    # the loader converts pytest-benchmark's seconds to the rows' microseconds, per test
    raw = {b["extra_info"]["op"] + "-" + b["extra_info"]["phase"]: b["stats"]["median"]
           for b in json.loads(out.read_text())["benchmarks"]}
    got = dict(zip(df["op"] + "-" + df["phase"], df["time_us"]))
    assert got == pytest.approx({k: v * 1e6 for k, v in raw.items()})


def test_benchmark_json_rejects_other_json(tmp_path):
    from analysis.load import load
    from microbench.runtime.results import ResultsError
    bad = tmp_path / "other.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ResultsError, match="other.json: not pytest-benchmark JSON"):
        load(bad)


@pytest.mark.parametrize("median, text", [(-0.1, "stats.median -0.1 is not a finite time ≥ 0 s"),
                                           (float("nan"), "stats.median nan is not a finite time"),
                                           ("fast", "stats.median 'fast' is not a finite time"),
                                           (0, "stats.median 0: a measured benchmark takes time")])
def test_benchmark_json_with_a_corrupt_time_is_named(tmp_path, median, text):
    """A negative or NaN median was loaded as a time (and text raised a TypeError); the good
    document it is made from loads (the control)."""
    from analysis.load import load
    from microbench.runtime.results import ResultsError
    doc = {"machine_info": {"node": "h"}, "datetime": "2026-12-03",
           "benchmarks": [{"name": "test_x", "stats": {"median": 0.002, "min": 0.001, "rounds": 3}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    assert load(path)["time_us"].tolist() == [2000.0]
    doc["benchmarks"][0]["stats"]["median"] = median
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=re.escape(f"bench.json: benchmarks[0] (test_x): {text}")):
        load(path)


@pytest.mark.parametrize("where, key, value, text", [
    ("extra_info", "flop", "abc", "extra_info.flop 'abc' is not a finite number ≥ 0"),  # a TypeError before
    ("stats", "data", [0.002, "x"], "time_us_samples 'x' is not a finite time ≥ 0 µs"),  # a TypeError before
    ("stats", "rounds", 0, "iters 0 is not an integer ≥ 1"),  # loaded before: what follows too
    ("extra_info", "m", -64, "m -64 is not an integer ≥ 1"),
    ("extra_info", "dtype", "fp7", "dtype 'fp7' is not one of"),
    ("stats", "max", 0.0015, "time_us_median 2000.0 is outside the row's own [time_us_min, time_us_max]"),
    (None, "extra_info", [1, 2], "extra_info is a list, not an object"),  # a TypeError before
])
def test_benchmark_json_fields_are_checked_as_run_rows_are(tmp_path, where, key, value, text):
    """extra_info and the stats become a row: the same checks as a run directory's rows apply,
    named by the benchmark, one line; the good document loads (the control)."""
    from analysis.load import load
    from microbench.runtime.results import ResultsError
    doc = {"machine_info": {"node": "h"}, "datetime": "2026-12-04",
           "benchmarks": [{"name": "test_x", "extra_info": {"kind": "gemm", "m": 64, "n": 64, "k": 64, "flop": 5.2e5,
                                                            "dtype": "fp32"},
                           "stats": {"median": 0.002, "min": 0.001, "max": 0.003, "rounds": 3, "data": [0.002] * 3}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    assert load(path)["time_us"].tolist() == [2000.0]
    (doc["benchmarks"][0] if where is None else doc["benchmarks"][0][where])[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=re.escape(f"bench.json: benchmarks[0] (test_x): {text}")):
        load(path)


def test_compute_does_not_import_peak():
    """peak.py imports compute.py; the other way round would be a circle (issue 10)."""
    import subprocess
    import sys
    from tests.launch import REPO, env
    code = "import sys, microbench.harness.compute, microbench.gemm, microbench.layer_ops; " \
           "print('microbench.peak' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.strip() == "False", res.stderr
