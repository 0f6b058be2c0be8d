"""Faults in real multi-rank runs (issue 12): a rank killed, rank 0 killed, SIGTERM and Ctrl-C,
under the embedded world and under mpiexec. Each asserts the exit code, the one line, the
manifest's status (naming the rank or the signal), that no earlier row changed, and that no
process of the run is left behind. fp32 and tiny sizes: the point is the lifecycle, not speed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import load
from microbench.runtime.results import MANIFEST, ROWS, read_run
from tests.launch import REPO, env, have_mpi, kill_group, mpiexec, pids_with, run_bounded, run_local, run_mpi

pytestmark = pytest.mark.multirank
SWEEP = ["-b", "1K", "-e", "1M", "-f", "2", "-n", "5", "-w", "1", "-d", "fp32", "--quiet"]
needs_mpi = pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")


def start(cmd, **extra_env):
    return subprocess.Popen(cmd, env=env(**extra_env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_rows(out: Path, n: int, proc, timeout=120) -> list[bytes]:
    """Block until ``n`` rows are on disk; the bytes of those rows (to compare later)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        try:
            lines = (out / ROWS).read_bytes().split(b"\n")
        except FileNotFoundError:
            lines = []
        if len(lines) > n:
            return lines[:n]
        time.sleep(0.2)
    kill_group(proc)
    raise AssertionError("no rows in time")


def finish(proc, timeout=90):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.returncode, out, err


def rank_pid(marker: str, rank: int, var: str) -> int:
    for pid in pids_with(marker):
        try:
            envs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{var}={rank}".encode() in envs and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no process of rank {rank}")


def no_orphans(marker: str) -> None:
    end = time.monotonic() + 10
    while pids_with(marker) and time.monotonic() < end:
        time.sleep(0.2)
    assert pids_with(marker) == []


def earlier_rows_unchanged(out: Path, before: list[bytes]) -> None:
    now = (out / ROWS).read_bytes().split(b"\n")
    assert now[:len(before)] == before


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# --- embedded world ----------------------------------------------------------------------------

@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, "parent"), (signal.SIGINT, "group")])
def test_embedded_world_stopped_by_a_signal(tmp_path, sig, how):
    out = tmp_path / "r"
    proc = start([sys.executable, "-m", "microbench.allreduce", *SWEEP, "--out", str(out)])
    before = wait_rows(out, 2, proc)
    if how == "parent":
        os.kill(proc.pid, sig)       # `kill PID` of the parent alone
    else:
        os.killpg(proc.pid, sig)     # Ctrl-C: the terminal signals the whole group
    code, _, err = finish(proc)
    assert code == 128 + sig
    line = one_error_line(err)
    assert f"interrupted by {sig.name}" in line and "marked interrupted" in line
    man, rows = read_run(out)
    assert man["status"] == "interrupted" and man["signal"] == sig.name
    earlier_rows_unchanged(out, before)
    no_orphans(str(out))


@pytest.mark.parametrize("victim", [1, 0])
def test_embedded_world_rank_killed(tmp_path, victim):
    out = tmp_path / "r"
    proc = start([sys.executable, "-m", "microbench.allreduce", *SWEEP, "--timeout-s", "20",
                  "--out", str(out)])
    before = wait_rows(out, 2, proc)
    os.kill(rank_pid(str(out), victim, "RANK"), signal.SIGKILL)
    code, _, err = finish(proc, timeout=120)
    # the survivor fails its case (exit 1) or is killed after its grace; a signal is no exit
    # code of the world's, so the world's is the failed case's: 1
    assert code == 1, err
    assert f"rank {victim} of the embedded 2-rank world ended with signal 9" in err
    man, rows = read_run(out)
    assert man["status"] == "failed"
    assert man["failure"]["first_ended"] == {"rank": victim, "how": "signal SIGKILL"}
    earlier_rows_unchanged(out, before)
    df = load(out)  # a failed run is loaded; its rows say so
    assert set(df["run_status"]) == {"failed"}
    no_orphans(str(out))


def test_dead_rank_is_named_in_the_manifest(tmp_path):
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-w", "0",
                    "-d", "fp32", "--timeout-s", "20", "--out", str(tmp_path / "r"), ranks=2,
                    timeout=120, MICROBENCH_FAULT="1:1")
    assert res.returncode == 17
    man, rows = read_run(tmp_path / "r")
    assert man["status"] == "failed" and man["failure"]["first_ended"]["rank"] == 1
    assert man["failure"]["ranks_without_report"] == [1]  # rank 0 heard nothing from it
    assert [r["status"] for r in rows] == ["ok", "failed"]


# --- mpiexec -------------------------------------------------------------------------------------

def named_rank(failure: dict) -> int | None:
    """The rank a failed run names: the watchdog's ``first_ended``, else a survivor's one dead rank."""
    if "first_ended" in failure:
        return failure["first_ended"]["rank"]
    dead = failure.get("dead_ranks") or []
    return dead[0] if len(dead) == 1 else None


def segments_removed(man: dict) -> None:
    """Ranks that never reached MPI_Finalize leave MPICH's shared-memory segment in /dev/shm;
    the watchdog removes it and the manifest says so."""
    assert man.get("removed_shm"), man
    assert not [p for p in man["removed_shm"] if Path(p).exists()]


def closed_failed_naming(out: Path, victim: int) -> dict:
    """Under MPICH a rank that dies makes Hydra SIGKILL every other rank a fraction of a second
    later. A survivor that saw the failure first closes the run ``failed``; when Hydra's kill
    wins, the host's watchdog (microbench/runtime/watchdog.py, outside Hydra's reach) closes it. Either
    way the run names the rank: the watchdog as ``first_ended`` when that rank ended clearly first,
    else (Hydra's kill within the watchdog's CLEAR_S of the death: seen once in CI with 4 ranks
    on 2 cores) the survivor's ``dead_ranks`` alone. ``load`` carries it. Wait for the watchdog
    first: it concludes a moment after the last rank is gone."""
    no_orphans(str(out))
    man = read_run(out)[0]
    assert man["status"] == "failed", man
    f = man["failure"]
    assert named_rank(f) == victim, f
    assert victim in man["failure"].get("dead_ranks", [victim])  # what a survivor saw, if one did
    df = load(out)
    assert set(df["run_status"]) == {"failed"}
    assert json.loads(df["run_failure"].iloc[0]) == f  # load carries what the manifest says
    segments_removed(man)
    return man


def start_mpi_sweep(out: Path, *, ranks: int):
    """The allreduce sweep under ``mpiexec -n ranks``, once its first two rows are written."""
    proc = start([mpiexec(), "-n", str(ranks), sys.executable, "-m", "microbench.allreduce", *SWEEP,
                  "--out", str(out)])
    return proc, wait_rows(out, 2, proc, timeout=180)


@needs_mpi
@pytest.mark.parametrize("victim", [2, 0])
def test_mpiexec_rank_dies_and_the_run_names_it(tmp_path, victim):
    res = run_mpi("microbench.allreduce", "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-w", "0",
                  "-d", "fp32", "--timeout-s", "15", "--out", str(tmp_path / "r"), ranks=4,
                  timeout=180, MICROBENCH_FAULT=f"{victim}:1")
    # mpiexec's own code is Hydra's choice (the dead rank's 17, or 9 for a rank it killed):
    # not fixed by us, so only "not success" is asserted; the run names the rank
    assert res.returncode != 0
    closed_failed_naming(tmp_path / "r", victim)
    rows = read_run(tmp_path / "r")[1]
    assert rows[0]["status"] == "ok" and rows[0]["num_wrong"] == 0


@needs_mpi
def test_mpiexec_run_is_closed_when_mpiexec_returns(tmp_path):
    """Issue 17: read at once after mpiexec returns, a run whose rank 1 died is already closed
    ``failed`` naming it, 10 times in 10 (the watchdog holds the ranks' stderr until it has
    closed the run, and Hydra returns at end-of-file); before, 6 reads in 6 said ``running``."""
    for i in range(10):
        out = tmp_path / f"r{i}"
        res = run_mpi("microbench.allreduce", "-b", "1K", "-e", "1M", "-f", "2", "-n", "5", "-w", "1",
                      "--timeout-s", "30", "--out", str(out), ranks=2, timeout=120, MICROBENCH_FAULT="1:3")
        man = json.loads((out / MANIFEST).read_text())  # the file as it is, no reader's help
        # mpiexec's own code is Hydra's choice (17, the dead rank's, or 9 for the rank it killed)
        assert res.returncode in (17, 9) and man["status"] == "failed", (i, res.returncode, man["status"])
        assert named_rank(man["failure"]) == 1, man["failure"]
        assert json.loads(load(out)["run_failure"].iloc[0]) == man["failure"]


@needs_mpi
def test_mpiexec_sigkill_of_a_rank_leaves_a_run_naming_it(tmp_path):
    out = tmp_path / "r"
    proc, before = start_mpi_sweep(out, ranks=4)
    os.kill(rank_pid(str(out), 3, "PMI_RANK"), signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code != 0  # Hydra's choice for a rank killed by a signal (not ours to fix)
    closed_failed_naming(out, 3)
    assert len(load(out)) >= 2
    earlier_rows_unchanged(out, before)


@needs_mpi
def test_mpiexec_sigterm_marks_the_run_interrupted(tmp_path):
    out = tmp_path / "r"
    proc, before = start_mpi_sweep(out, ranks=2)
    os.kill(proc.pid, signal.SIGTERM)  # Hydra forwards it to every rank
    code, _, err = finish(proc)
    # every rank exits 128 + SIGTERM; Hydra returns that, or 9 where the first rank's exit
    # made it kill a rank still closing (CI at 9f5b08e under load): Hydra's code, not ours
    assert code in (128 + signal.SIGTERM, 9)
    assert "interrupted by SIGTERM" in one_error_line(err) and "marked interrupted" in err
    man = json.loads((out / MANIFEST).read_text())
    # rank 0 closes it; rank 1 waits for that (lifecycle.CLOSE_WAIT_S) and closes it only if
    # rank 0 is still blocked in a collective: one rank, named, and the one line is its
    assert man["status"] == "interrupted" and man["signal"] == "SIGTERM"
    assert man["interrupted_rank"] in (0, 1)
    assert (out / ".closed-by").read_text() == f"{man['interrupted_rank']}\n"
    segments_removed(man)
    earlier_rows_unchanged(out, before)
    no_orphans(str(out))


@needs_mpi
def test_mpiexec_layout_error_is_one_line_exit_2(tmp_path):
    res = run_mpi("microbench.allreduce", "--model", "tiny", "--tp", "2", "-d", "fp32",
                  "--out", str(tmp_path / "r"), ranks=3, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "terminate called" not in res.stderr
    assert "tp(2) × pp(1) × dp(1) = 2 ≠ world 3" in one_error_line(res.stderr)
    assert not (tmp_path / "r" / MANIFEST).exists()


def test_disk_full_mid_run_keeps_the_good_rows(tmp_path):
    """A file-size limit (``ulimit -f``, Python turns SIGXFSZ into EFBIG) stands in for a full
    disk: the row being written is torn; the run closes ``failed`` naming the error, exit 1;
    the reader keeps the rows before it and names the torn line."""
    out = tmp_path / "r"
    cmd = " ".join([sys.executable, "-m", "microbench.allreduce", *SWEEP, "--timeout-s", "20",
                    "--out", str(out)])
    res = run_bounded(["bash", "-c", f"ulimit -f 12; exec {cmd}"], env_=env(), timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    man, rows = read_run(out)
    assert man["status"] == "failed" and "File too large" in man["failure"]["reason"]
    with pytest.warns(UserWarning, match=r"rows.jsonl:\d+: torn last line"):
        df = load(out)
    assert len(df) == len(rows) > 0 and (df["status"] == "ok").all()
    no_orphans(str(out))
