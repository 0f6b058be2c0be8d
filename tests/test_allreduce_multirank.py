"""Real multi-rank allreduce runs (gloo on loopback): rows, correctness counts, busbw
arithmetic; under the embedded launcher and under mpiexec; and a rank that dies mid-sweep."""
import pytest

from analysis import load
from microbench.runtime.results import read_run
from tests.launch import have_mpi, run_local, run_mpi

pytestmark = pytest.mark.multirank


def check_rows(df, n):
    ok = df[df.status == "ok"]
    assert len(ok) == len(df) > 0
    assert (ok.num_wrong == 0).all() and (ok.num_checked == ok["count"] * ok.world_size).all()
    assert (ok.group_size == n).all()
    algbw = ok.size_bytes / (ok.time_us * 1e-6) / 1e9
    assert algbw.values == pytest.approx(ok.algbw_gbps.values, rel=1e-9)
    assert ok.busbw_gbps.values == pytest.approx(ok.algbw_gbps.values * 2 * (n - 1) / n, rel=1e-9)
    assert ok.time_us_samples.map(len).eq(ok.iters).all()


def test_embedded_two_rank_sweep(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "64K", "-f", "4", "-n", "3", "-w", "1",
                    "--out", str(tmp_path / "r"), ranks=2)
    assert res.returncode == 0, res.stderr
    assert "Avg bus bandwidth" in res.stdout and "launcher embedded" in res.stdout
    df = load(tmp_path / "r")
    check_rows(df, 2)
    assert sorted(set(df.size_bytes)) == [1024, 4096, 16384, 65536]
    assert set(df.place) == {"in", "out"}


def test_embedded_four_rank_tp_groups_run_at_once(tmp_path):
    res = run_local("microbench.allreduce", "--model", "tiny", "--tp", "2", "--dp", "2",
                    "-n", "3", "-w", "1", "--out", str(tmp_path / "r"), ranks=4, timeout=180)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    check_rows(df, 2)
    assert (df.num_groups == 2).all() and (df.axis == "tp").all()
    assert (df.crosses_nodes == False).all()  # noqa: E712 — one host
    # tiny: mbs 2 × seq 128 × hidden 128 fp32 = the [mbs·s, d] activation
    assert set(df.size_bytes) == {2 * 128 * 128 * 4}
    man, _ = read_run(tmp_path / "r")
    assert man["world_size"] == 4 and man["grid"] == {"tp": 2, "pp": 1, "dp": 2}


def test_one_group_alone_leaves_the_others_idle(tmp_path):
    res = run_local("microbench.allreduce", "--model", "tiny", "--tp", "2", "--dp", "2",
                    "--groups", "one", "--place", "in", "-n", "3", "-w", "1",
                    "--out", str(tmp_path / "r"), ranks=4, timeout=180)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    assert (df.num_groups == 1).all() and (df.num_wrong == 0).all()


def test_world_of_one_says_why_there_is_no_busbw(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "1K", "-n", "2", "-w", "0",
                    "--out", str(tmp_path / "r"), ranks=1)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    assert df.busbw_gbps.isna().all()
    assert (df.note == "group of one rank: no bus bandwidth").all()
    assert "n/a" in res.stdout and "Avg bus bandwidth    : n/a" in res.stdout


@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")
def test_mpiexec_two_ranks(tmp_path):
    res = run_mpi("microbench.allreduce", "-b", "1K", "-e", "16K", "-f", "4", "-n", "3", "-w", "1",
                  "--out", str(tmp_path / "r"), ranks=2)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    check_rows(df, 2)
    man, _ = read_run(tmp_path / "r")
    assert man["launcher"] == "mpich" and man["versions"].get("mpi_library")


@pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")
def test_mpiexec_four_ranks_model_mode(tmp_path):
    res = run_mpi("microbench.allreduce", "--model", "tiny", "--tp", "2", "--dp", "2", "--place", "in",
                  "-n", "3", "-w", "1", "--out", str(tmp_path / "r"), ranks=4, timeout=180)
    assert res.returncode == 0, res.stderr
    df = load(tmp_path / "r")
    check_rows(df, 2)
    assert (df.num_groups == 2).all()


def test_dead_rank_ends_the_run_and_keeps_earlier_rows(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "64K", "-f", "4", "-n", "3", "-w", "1",
                    "--timeout-s", "20", "--out", str(tmp_path / "r"), ranks=2, timeout=90,
                    MICROBENCH_FAULT="1:2")
    assert res.returncode == 17, res.stderr  # the dead rank's own code (rank 0's failed case is 1)
    assert "rank 1 of the embedded 2-rank world ended with exit code 17" in res.stderr
    assert "rank 0" in res.stderr and "case allreduce-4096-out failed" in res.stderr
    man, rows = read_run(tmp_path / "r")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[0]["num_wrong"] == 0 and man["status"] == "failed"


def test_hung_rank_ends_the_run_within_the_timeout(tmp_path):
    # run_local's own timeout (120 s) bounds the whole run: no endless hang
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "4K", "-f", "4", "-n", "2", "-w", "0",
                    "--timeout-s", "5", "--out", str(tmp_path / "r"), ranks=2, timeout=120,
                    MICROBENCH_FAULT="1:1:hang")
    assert res.returncode == 1, res.stderr  # rank 0's failed case; the hung rank is killed (a signal)
    assert "rank 0" in res.stderr and "group timeout 5 s" in res.stderr
    assert "rank 1 still running" in res.stderr  # the launcher ends the hung rank
    _, rows = read_run(tmp_path / "r")
    assert [r["status"] for r in rows] == ["ok", "failed"]
