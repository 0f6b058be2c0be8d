"""XPU paths for real (Aurora, Sunspot): device events, xccl/ccl, GEMMs on a tile.
Skipped cleanly where there is no Intel GPU."""
import pytest

torch = pytest.importorskip("torch")
HAS_XPU = hasattr(torch, "xpu") and torch.xpu.is_available()
pytestmark = [pytest.mark.xpu, pytest.mark.skipif(not HAS_XPU, reason="needs an Intel GPU (XPU)")]

from analysis import load  # noqa: E402
from tests.launch import run_local  # noqa: E402


def test_gemm_probe_on_a_tile(tmp_path):
    res = run_local("microbench.gemm", "--model", "alcf-1t", "--tp", "12", "--scale", "0.25",
                    "-n", "5", "-w", "2", "--device", "xpu", "--out", str(tmp_path / "r"), ranks=1,
                    timeout=600)
    assert res.returncode == 0, res.stderr
    ok = load(tmp_path / "r").query("status == 'ok'")
    assert (ok.num_wrong == 0).all() and ok.tflops.gt(0).all()


def test_auto_backend_is_xccl_or_ccl(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1M", "-e", "1M", "-n", "3", "--device", "xpu",
                    "--out", str(tmp_path / "r"), ranks=1, timeout=300)
    assert res.returncode == 0, res.stderr
    assert set(load(tmp_path / "r").backend) <= {"xccl", "ccl"}
