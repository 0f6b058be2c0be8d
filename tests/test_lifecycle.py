"""The run's lifecycle without a world: outcome and exit code, a run directory written once,
closing a run nobody closed, and readers that keep what is good (issue 12)."""
import errno
import json
import os
import socket
import sys

import pytest

from analysis import load
from microbench.runtime import results
from microbench.harness.lifecycle import finish, outcome
from microbench.runtime.results import MANIFEST, ROWS, ResultsError, RunWriter, close_unclosed, read_run
from microbench.runtime.errors import UsageError
from microbench.runtime.launch import detect_launcher
from tests.launch import env, run_bounded


def write_run(path, rows, *, close=True):
    w = RunWriter(path, {"probe": "t", "world_size": 2, "device": "cpu"})
    for r in rows:
        w.write_row(r)
    if close:
        w.close(status="ok")
    return path


def snapshot(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


# --- outcome and exit code -----------------------------------------------------------------

@pytest.mark.parametrize("rows, status, code", [
    ([{"case": "a", "status": "ok", "num_wrong": 0}], "ok", 0),
    ([{"case": "a", "status": "ok"}, {"case": "b", "status": "skipped"}], "ok", 0),
    ([{"case": "a", "status": "ok", "num_wrong": 3}], "failed", 1),
    ([{"case": "a", "status": "failed", "reason": "OOM"}] * 2, "failed", 1),  # every case failed
])
def test_outcome_follows_the_rows(rows, status, code):
    assert outcome(rows)[:2] == (status, code)


def test_wrong_elements_close_the_manifest_failed_with_the_count(tmp_path):
    w = RunWriter(tmp_path / "r", {"probe": "t"})
    rows = [{"probe": "t", "case": "a", "status": "ok", "num_wrong": 0},
            {"probe": "t", "case": "b", "status": "ok", "num_wrong": 7}]
    for r in rows:
        w.write_row(r)
    assert finish(w, rows, host="h") == 1
    man, _ = read_run(tmp_path / "r")
    assert man["status"] == "failed"
    assert man["failure"]["case"] == "b" and "7 wrong" in man["failure"]["reason"]


# --- a run directory is written once -------------------------------------------------------

def test_a_new_run_never_writes_into_an_existing_run(tmp_path):
    d = write_run(tmp_path / "r", [{"case": "a"}])
    before = snapshot(d)
    with pytest.raises(ValueError, match="existing run; a run directory is written once"):
        RunWriter(d, {"probe": "t"})
    assert snapshot(d) == before


def test_an_empty_directory_may_hold_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "empty", [{"case": "a"}])
    assert read_run(tmp_path / "empty")[0]["status"] == "ok"


@pytest.mark.parametrize("kind, match", [
    ("file", "exists and is not a directory"),
    ("under-file", "is a file, not a directory"),
    ("non-empty", "non-empty directory"),
])
def test_bad_out_targets_are_named(tmp_path, kind, match):
    p = tmp_path / "t"
    if kind == "non-empty":
        p.mkdir()
        (p / "notes.txt").write_text("x")
        target = p
    else:
        p.write_text("x")
        target = p if kind == "file" else p / "sub" / "run"
    with pytest.raises(ValueError, match=match):
        results.check_out_dir(target)


def test_read_only_file_system_is_refused(tmp_path, monkeypatch):
    class RO:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(results.os, "statvfs", lambda p: RO())
    with pytest.raises(ValueError, match="is not writable"):
        results.check_out_dir(tmp_path / "new")


# --- closing a run nobody closed; incomplete runs ------------------------------------------

def test_a_survivor_closes_an_unclosed_run_once(tmp_path):
    d = write_run(tmp_path / "r", [{"case": "a"}], close=False)
    assert read_run(d)[0]["status"] == "incomplete"
    assert close_unclosed(d, status="failed", failure={"rank": 0, "reason": "rank 0 killed"})
    assert not close_unclosed(d, status="interrupted", signal="SIGINT")  # already closed
    man, rows = read_run(d)
    assert man["status"] == "failed" and man["failure"]["rank"] == 0 and man["num_rows"] == 1


def test_incomplete_run_is_refused_unless_allowed(tmp_path, monkeypatch):
    d = write_run(tmp_path / "r", [{"case": "a"}], close=False)
    with pytest.raises(ResultsError, match="incomplete run .*allow_incomplete=True"):
        load(d)
    assert load(d, allow_incomplete=True)["run_status"].tolist() == ["incomplete"]
    monkeypatch.setenv("MICROBENCH_ALLOW_INCOMPLETE", "1")
    assert len(load(d)) == 1


# --- readers keep what is good -------------------------------------------------------------

def test_torn_last_line_is_named_and_good_rows_kept(tmp_path):
    d = write_run(tmp_path / "r", [{"case": f"c{i}"} for i in range(38)])
    with open(d / ROWS, "a") as f:
        f.write('{"schema_version": 1, "case": "c38", "time_us": 12')  # disk full mid-line
    with pytest.warns(UserWarning, match=r"rows.jsonl:39: torn last line"):
        df = load(d)
    assert len(df) == 38 and df.attrs["problems"][0].startswith(str(d / ROWS))


def test_disk_full_mid_row_leaves_a_readable_run(tmp_path, monkeypatch):
    """ENOSPC injected into the row file's write: half a line reaches the disk, then the
    error; the writer still closes the manifest, and the reader keeps the earlier rows."""
    w = RunWriter(tmp_path / "r", {"probe": "t"})
    w.write_row({"case": "a"})
    real = w._rows

    class Full:
        closed = False

        def write(self, text):
            real.write(text[: len(text) // 2])
            real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)
    w._rows = Full()
    with pytest.raises(OSError):
        w.write_row({"case": "b"})
    w._rows = real
    w.close(status="failed", failure={"reason": "disk full"})
    problems = []
    man, rows = read_run(tmp_path / "r", problems=problems)
    assert [r["case"] for r in rows] == ["a"] and man["status"] == "failed"
    assert "rows.jsonl:2: torn last line" in problems[0]


def test_malformed_middle_line_is_still_an_error(tmp_path):
    d = write_run(tmp_path / "r", [{"case": "a"}])
    with open(d / ROWS, "a") as f:
        f.write("{oops\n" + json.dumps({"schema_version": 1, "case": "b"}) + "\n")
    with pytest.raises(ResultsError, match=r"rows.jsonl:2: malformed JSON line"):
        read_run(d)


@pytest.mark.parametrize("name", [MANIFEST, ROWS])
def test_binary_files_are_named_in_one_line(tmp_path, name):
    d = write_run(tmp_path / "r", [{"case": "a"}])
    (d / name).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ResultsError) as e:
        load(d)
    assert str(d / name) in str(e.value) and "not a UTF-8 text file" in str(e.value)
    assert "\n" not in str(e.value)


def test_the_same_run_twice_is_loaded_once(tmp_path):
    import shutil
    d = write_run(tmp_path / "runs" / "a", [{"case": "a"}, {"case": "b"}])
    shutil.copytree(d, tmp_path / "runs" / "a-copy")
    with pytest.warns(UserWarning, match="the same run"):
        df = load([d, tmp_path / "runs"])
    assert sorted(df["case"]) == ["a", "b"]


# --- launcher variables ---------------------------------------------------------------------

@pytest.mark.parametrize("env_, named", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "PMI_RANK": "0", "PMI_SIZE": "2"},
     "RANK=1, PMI_RANK=0"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "PMI_RANK": "0", "PMI_SIZE": "2"},
     "OMPI_COMM_WORLD_SIZE=4, PMI_SIZE=2"),
    ({"PMI_RANK": "5", "PMI_SIZE": "2"}, "PMI_RANK=5 is outside a world of PMI_SIZE=2"),
])
def test_contradictory_launcher_variables_are_a_usage_error(env_, named):
    with pytest.raises(UsageError, match=named):
        detect_launcher(env_)


def test_agreeing_variables_and_slurm_nesting_are_accepted():
    # mpiexec under an srun-started proxy: SLURM_PROCID is the node, not the rank
    info = detect_launcher({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "1",
                            "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
    assert info.launcher == "mpich" and info.rank == 3


def one_line_exit_2(res, *needles):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0]


def test_pmi_rank_abc_is_one_line(tmp_path):
    res = run_bounded([sys.executable, "-m", "microbench.allreduce", "-b", "1K", "-e", "1K"],
                      env_=env(PMI_RANK="abc", PMI_SIZE="2"), timeout=60)
    one_line_exit_2(res, "PMI_RANK='abc'")


def test_port_taken_by_another_program_is_one_line_naming_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_bounded([sys.executable, "-m", "microbench.allreduce", "-b", "1K", "-e", "1K",
                           "--timeout-s", "10", "--out", str(tmp_path / "r")],
                          env_=env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(port)),
                          timeout=60)
    one_line_exit_2(res, f"127.0.0.1:{port}", "in use")
    assert not (tmp_path / "r" / MANIFEST).exists()


def test_unresolvable_master_addr_is_one_line(tmp_path):
    res = run_bounded([sys.executable, "-m", "microbench.allreduce", "-b", "1K", "-e", "1K",
                       "--timeout-s", "10"],
                      env_=env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="29533",
                               MASTER_ADDR="no-such-host.invalid"), timeout=60)
    one_line_exit_2(res, "MASTER_ADDR='no-such-host.invalid'", "29533")


def test_a_rank_that_never_comes_is_bounded_by_the_timeout(tmp_path):
    """Rank 0 of a 2-rank world alone: the store connect waits for rank 1, which never comes.
    The run ends within --timeout-s (+5 s slack), with one line naming address and port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_bounded([sys.executable, "-m", "microbench.allreduce", "-b", "1K", "-e", "1K",
                       "--timeout-s", "4", "--out", str(tmp_path / "r")],
                      env_=env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_PORT=str(port)),
                      timeout=90)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "did not complete within 4 s" in lines[0]


def test_every_command_that_reads_runs_takes_allow_incomplete(tmp_path):
    """Issue 17: the flag beside the variable, on report, predict, project and crosscheck."""
    d = tmp_path / "gemm"
    res = run_bounded([sys.executable, "-m", "microbench.gemm", "--model", "tiny", "-n", "2", "-w", "0",
                       "--no-peak", "--ranks", "1", "--quiet", "--out", str(d)], env_=env(), timeout=120)
    assert res.returncode == 0, res.stderr
    man = json.loads((d / MANIFEST).read_text())
    man["status"] = "running"  # as if every rank had died before closing it
    (d / MANIFEST).write_text(json.dumps(man))
    prof = ["--profile", str(d), "--system", "aurora", "--model", "tiny"]
    commands = {"analysis.predict": prof, "analysis.project": [*prof, "--nodes", "1"],
                "analysis.report": [str(d), "--out", str(tmp_path / "rep"), "--system", "aurora"]}
    for module, argv in commands.items():
        refused = run_bounded([sys.executable, "-m", module, *argv], env_=env(), timeout=120)
        assert refused.returncode == 2 and "incomplete run" in refused.stderr, (module, refused.stderr)
        allowed = run_bounded([sys.executable, "-m", module, *argv, "--allow-incomplete"], env_=env(),
                              timeout=120)
        assert allowed.returncode == 0, (module, allowed.stderr)
