"""The host's term (issue 19): the host probe on this CPU (embedded world and mpiexec), its rows
in a measured profile, and the per-call latency law of a spec."""
import json

import pytest

from analysis import load
from analysis.measured import MeasuredProfile
from analysis.placement import Placement
from analysis.spec import SpecProfile
from microbench.model.metrics import latency_steps
from microbench.model.workload import Collective, HostPath
from tests.launch import have_mpi, run_local, run_mpi

HOST = ["--model", "tiny", "--tp", "2", "-n", "3", "-w", "1", "-d", "fp32", "--quiet"]


@pytest.mark.multirank
def test_host_probe_on_the_embedded_world_loads_and_prices_the_host_term(tmp_path):
    res = run_local("microbench.host", *HOST, "--out", str(tmp_path / "h"), ranks=2, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    df = load(tmp_path / "h")
    assert sorted(zip(df["path"], df["phase"])) == [("-", "tp_call"), ("explicit", "bwd"), ("explicit", "fwd"),
                                                     ("fused", "bwd"), ("fused", "fwd")]
    assert (df["kind"] == "host").all() and (df["num_wrong"] == 0).all() and (df["host_us"] >= 0).all()
    layer = df[df["op"] == "layer"]
    assert (layer["ops_us"] > 0).all()
    assert set(df["hidden"]) == {64} and set(df["seq"]) == {64}
    # the TP call: one reduction of the narrowed activation (mbs 2 × seq 64 × hidden 64) on the
    # group of 2, its host clock in host_us; on this CPU (synchronous) priced inside the collective
    call = df[df["op"] == "tp_call"].iloc[0]
    assert call["group_size"] == 2 and call["elements"] == 2 * 64 * 64 and call["host_us"] > 0
    prof = MeasuredProfile.from_rows(df, fallback="dgx-a100-80gb")  # explicit attention, like Megatron
    row = df[(df["path"] == "explicit") & (df["phase"] == "fwd")].iloc[0]
    want = max(0.0, row["time_us_mean"] - row["ops_us"]) * 1e-6  # the profile prices by the mean
    priced = prof.host(HostPath("fwd"))
    assert priced.seconds == pytest.approx(want, rel=1e-9)
    assert priced.source.startswith("extrapolated (host probe at hidden 64 seq 64")
    assert not prof.asynchronous  # measured on a CPU: host and device add
    assert prof.host(HostPath("fwd", 2, "tp_call")).seconds == 0.0
    prof.asynchronous = True  # as on a GPU: the call returns at enqueue, its host clock is the term
    priced = prof.host(HostPath("fwd", 2, "tp_call"))
    assert priced.seconds == pytest.approx(call["host_us"] * 1e-6, rel=1e-12)  # one call: the predictor counts
    assert priced.source.startswith("extrapolated (host probe's tp_call")


@pytest.mark.mpi
@pytest.mark.multirank
@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")
def test_host_probe_under_mpiexec(tmp_path):
    res = run_mpi("microbench.host", *HOST, "--out", str(tmp_path / "h"), ranks=2, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    man = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert man["status"] == "ok" and man["launcher"] == "mpich" and man["world_size"] == 2
    assert len(load(tmp_path / "h")) == 5  # 2 attention paths × fwd, bwd and the TP call


def test_latency_law_at_2_8_and_64_ranks():
    """dgx-a100-80gb: inside a node a ring, 6 µs + 2 µs per step, 2(n−1) steps for an allreduce;
    between nodes a tree, 6.8 µs + 5 µs per step, 2·log2(nodes) steps."""
    p = SpecProfile.from_yaml("dgx-a100-80gb")
    assert [latency_steps("allreduce", n, "ring") for n in (2, 8, 64)] == [2, 14, 126]
    assert [latency_steps("allgather", n, "ring") for n in (2, 8, 64)] == [1, 7, 63]
    assert [latency_steps("allreduce", n, "tree") for n in (2, 8, 64)] == [2, 6, 12]
    assert [p.alpha_s("intra", "allreduce", n) * 1e6 for n in (2, 8, 64)] == pytest.approx([10, 34, 258])
    assert [p.alpha_s("inter", "allreduce", n) * 1e6 for n in (2, 8, 64)] == pytest.approx([16.8, 36.8, 66.8])
    one_byte = Collective("c", "allreduce", "tp", 1, "fp32", 1, "fwd", 8)
    bw = 300e9 * 0.78  # NVLink 3 busbw × the file's efficiency
    assert p.collective(one_byte, Placement(False, 8, 1, 1)).seconds == pytest.approx(
        34e-6 + 4 * 2 * 7 / 8 / bw, rel=1e-12)
    # 64 ranks over 8 nodes: reduce-scatter and allgather inside (7 ring steps each), a tree
    # allreduce of S/8 between the 8 nodes (6 steps)
    wide = Collective("c", "allreduce", "dp", 1, "fp32", 1, "step", 64)
    intra = 2 * (6e-6 + 2e-6 * 7 + 4 * 7 / 8 / bw)
    inter = 6.8e-6 + 5e-6 * 6 + 2 * 7 / 8 * (4 / 8) / (25e9 * 8 * 0.85 / 8)
    assert p.collective(wide, Placement(True, 8, 8, 1)).seconds == pytest.approx(intra + inter, rel=1e-12)
