"""Real 2- and 4-rank runs of the communication probes (gloo on loopback): pipeline pairs
of tp2×pp2 in both directions, DP groups at once, ZeRO-1 moving the bytes of an allreduce,
the sequence-parallel collectives' factors, the overlap summary, and the mpi4py path."""

import pytest

from analysis import load
from microbench.model.config import tiny, with_layout
from microbench.model.workload import workload
from tests.launch import have_mpi, run_local, run_mpi

pytestmark = pytest.mark.multirank
FAST = ("-n", "3", "-w", "1", "--quiet")
TINY_PARAMS = 1_180_800  # see test_comm_probes
ACT = 2 * 128 * 128  # tiny: [mbs·s, d] = [2·128, 128]


def ok_rows(res, path):
    assert res.returncode == 0, res.stderr[-2000:]
    df = load(path)
    assert (df.status == "ok").all(), df[df.status != "ok"].reason.tolist()
    for col in ("axis", "group_size", "num_groups", "ranks_per_node", "crosses_nodes"):
        assert df[col].notna().all(), col  # placement and concurrency on every row
    return df


def check_sendrecv(df):
    assert set(df["mode"]) == {"oneway", "1f1b"}
    assert set(df.op) == {"pp_activation", "pp_activation+pp_gradient"}
    for row in df.itertuples():
        assert row.pairs == [[0, 2], [1, 3]] and row.num_groups == 2  # both stage pairs at once
        assert row.count == ACT and row.num_wrong == 0 and not row.crosses_nodes
        # oneway: 2 receivers check the activation; 1f1b: all 4 ranks check what they got
        assert row.num_checked == ACT * (2 if row.mode == "oneway" else 4)
        assert row.bytes_per_pair == row.size_bytes * (1 if row.mode == "oneway" else 2)
        assert row.busbw_gbps == pytest.approx(row.algbw_gbps)


def test_sendrecv_tp2_pp2_both_pairs_both_directions(tmp_path):
    res = run_local("microbench.sendrecv", "--model", "tiny", "--tp", "2", "--pp", "2", *FAST,
                    "--out", str(tmp_path / "r"), ranks=4, timeout=90)
    check_sendrecv(ok_rows(res, tmp_path / "r"))


@pytest.mark.parametrize("zero", ["0", "1"])
def test_dp_sync_step_with_its_extrapolation(tmp_path, zero):
    res = run_local("microbench.dp_allreduce", "--model", "tiny", "--dp", "2", "--zero", zero,
                    "--bucket-mb", "0.5", "--max-bytes", "1M", *FAST, "--out", str(tmp_path / "r"),
                    ranks=2, timeout=90)
    df = ok_rows(res, tmp_path / "r")
    step = df[df.op == "dp_sync_step"].iloc[0]
    measured = df[df.op == "dp_sync_measured"].iloc[0]
    extra = step.extra
    assert extra["num_buckets_total"] == 10 and extra["grad_bytes_per_rank"] == TINY_PARAMS * 4
    assert extra["num_buckets_measured"] == (2 if zero == "0" else 1)  # 512 KiB vs 1 MiB per bucket
    f = extra["extrapolation_factor"]
    assert f == pytest.approx(TINY_PARAMS / (131072 * extra["num_buckets_measured"]))
    assert step.time_us == pytest.approx(measured.time_us * f) and step.extrapolated
    # n = 2: an allreduce's links carry 2(n-1)/n = 1 gradient; DeepSpeed's ZeRO-1 allreduces
    # too, then allgathers the updated parameters (fp32 here): (n-1)/n = 1/2 more
    assert step.bus_bytes == pytest.approx(TINY_PARAMS * 4 * (1.0 if zero == "0" else 1.5))
    assert list(df[df.op != "dp_sync_measured"].op.drop_duplicates()) == (
        ["dp_allreduce", "dp_sync_step"] if zero == "0" else
        ["dp_allreduce", "dp_allgather", "dp_sync_step"])
    assert (df.num_wrong.fillna(0) == 0).all()


def test_reduce_scatter_zero_bucket_on_concurrent_dp_groups(tmp_path):
    res = run_local("microbench.reduce_scatter", "--model", "tiny", "--tp", "2", "--dp", "2",
                    "--axis", "dp", *FAST, "--out", str(tmp_path / "r"), ranks=4, timeout=90)
    df = ok_rows(res, tmp_path / "r")
    assert (df.op == "dp_reduce_scatter").all() and (df.num_groups == 2).all()
    assert (df.group_size == 2).all() and (df.num_wrong == 0).all()
    grad = workload(with_layout(tiny(), tp=2, dp=2)).dp_grad_bytes  # TP halves the layers' share
    assert (df.size_bytes == grad).all() and (df.dtype == "fp32").all()  # one bucket > the gradient
    assert df.busbw_gbps.values == pytest.approx(df.algbw_gbps.values * 0.5)


def test_allgather_and_alltoall_sweeps_use_nccl_tests_factors(tmp_path):
    for probe in ("allgather", "alltoall"):
        res = run_local(f"microbench.{probe}", "-b", "1K", "-e", "16K", "-f", "16", *FAST,
                        "--out", str(tmp_path / probe), ranks=2, timeout=90)
        df = ok_rows(res, tmp_path / probe)
        assert sorted(set(df.size_bytes)) == [1024, 16384] and (df.num_wrong == 0).all()
        assert df.busbw_gbps.values == pytest.approx(df.algbw_gbps.values * 0.5)
        assert (df.num_checked == df["count"] * 2).all()  # every rank checks the whole output


def test_overlap_reports_exposed_fraction_with_components(tmp_path):
    res = run_local("microbench.overlap", "--model", "tiny", "--dp", "2", *FAST,
                    "--out", str(tmp_path / "r"), ranks=2, timeout=90)
    df = ok_rows(res, tmp_path / "r")
    assert list(df.variant) == ["gemm_alone", "collective_alone", "both", "summary"]
    s = df.iloc[-1]
    e = s.extra
    assert s.kind == "overlap" and s.exposed_fraction == e["exposed_fraction"]
    # the summary is built from the three measured rows above it (not from other timings)
    t = dict(zip(df.variant[:3], df.time_us[:3]))
    assert (e["time_us_gemm_alone"], e["time_us_coll_alone"], e["time_us_both"]) == \
        (t["gemm_alone"], t["collective_alone"], t["both"])
    assert s.exposed_fraction == pytest.approx((t["both"] - t["gemm_alone"]) / t["collective_alone"])
    assert e["collective"] == {"name": "dp_allreduce", "bytes": TINY_PARAMS * 4}
    assert [g["name"] for g in e["gemm"]] == ["fc2.dgrad", "fc2.wgrad", "fc1.dgrad", "fc1.wgrad"]
    # only the cases with a collective are checked: the whole fp32 gradient bucket on 2 ranks
    checked = dict(zip(df.variant[:3], df.num_checked[:3]))
    assert checked == {"gemm_alone": 0, "collective_alone": 2 * TINY_PARAMS, "both": 2 * TINY_PARAMS}
    assert (df.num_wrong.fillna(0) == 0).all()


@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py")
def test_mpiexec_sendrecv_tp2_pp2(tmp_path):
    res = run_mpi("microbench.sendrecv", "--model", "tiny", "--tp", "2", "--pp", "2", *FAST,
                  "--out", str(tmp_path / "r"), ranks=4, timeout=90)
    check_sendrecv(ok_rows(res, tmp_path / "r"))


@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py")
def test_mpi4py_second_opinion_allreduce(tmp_path):
    res = run_mpi("microbench.allreduce", "--backend", "mpi4py", "-b", "1K", "-e", "64K", "-f", "64",
                  *FAST, "--out", str(tmp_path / "r"), ranks=2, timeout=90)
    df = ok_rows(res, tmp_path / "r")
    assert (df.backend == "mpi4py").all() and (df.num_wrong == 0).all()
    assert (df.num_checked == df["count"] * 2).all()
