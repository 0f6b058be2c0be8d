"""CUDA paths for real: device events, NCCL on one rank, GEMMs and attention on the GPU.
Skipped cleanly where there is no NVIDIA GPU (CI and laptops)."""
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

from analysis import load  # noqa: E402
from microbench.runtime.results import read_run  # noqa: E402
from tests.launch import run_local  # noqa: E402


def test_gemm_probe_times_with_device_events(tmp_path):
    res = run_local("microbench.gemm", "--model", "alcf-1t", "--tp", "12", "--scale", "0.25",
                    "-n", "5", "-w", "2", "--device", "cuda", "--out", str(tmp_path / "r"), ranks=1,
                    timeout=600)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    ok = df[df.status == "ok"]
    assert (ok.timing == "device_events").all() and (ok.num_wrong == 0).all()
    assert ok.tflops.gt(0).all()
    man, _ = read_run(tmp_path / "r")
    assert man["device"] == "cuda" and man["peak_tflops"]


def test_attention_fused_and_explicit(tmp_path):
    res = run_local("microbench.attention", "--model", "alcf-1t", "--tp", "12", "-n", "3", "-w", "1",
                    "--device", "cuda", "--out", str(tmp_path / "r"), ranks=1, timeout=600)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    att = df[(df.kind == "attention") & (df.status == "ok")]
    assert set(att.path) == {"fused", "explicit"} and (att.num_wrong == 0).all()


def test_nccl_initialises_on_one_rank(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1M", "-e", "64M", "-f", "8", "-n", "5",
                    "--device", "cuda", "--backend", "nccl", "--out", str(tmp_path / "r"), ranks=1,
                    timeout=300)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    assert (df.backend == "nccl").all() and (df.num_wrong == 0).all()
    assert df.busbw_gbps.isna().all()  # a group of one has no bus bandwidth
