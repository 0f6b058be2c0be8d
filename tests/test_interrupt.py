"""A command that runs other processes (the cross-check, the grid, ``full_model.megatron run``)
stopped by SIGTERM (a scheduler's kill, ``kill PID``) or Ctrl-C: its children end with it, the
logs and manifests say what happened, and it exits 128+N with one line. Before, SIGTERM ended
the command at once and the framework's ranks, in sessions of their own, trained on (seen on
2026-12-04: a killed ``full_model.megatron run`` left both ranks and their /dev/shm buffers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, env

SLEEPER = """import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
rank = os.environ.get("RANK", os.environ.get("PMI_RANK", "x"))
def term(signum, frame):
    (out / f"term-{rank}").write_text("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
(out / f"pid-{rank}").write_text(str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for(paths: list[Path], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)


def _terminate(harness: str, tmp_path: Path, ready: list[Path],
               sig: int = signal.SIGTERM) -> tuple[subprocess.Popen, str]:
    """Run ``harness`` (Python), wait for its children to be up, send ``sig`` to it alone (not
    its group: the children get nothing from outside), and return it once it has ended."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    proc = subprocess.Popen([sys.executable, "-c", harness], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(ready)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, err


@pytest.mark.timeout(120)
def test_sigterm_to_the_cross_check_ends_its_probe_and_the_log_says_so(tmp_path):
    """The probe child gets SIGTERM (a probe closes its run ``interrupted`` on it), is gone when
    the command exits 143, and the command's log of it names the signal."""
    log = tmp_path / "probe.log"
    harness = f"""
import sys
from pathlib import Path
from analysis.crosscheck.probes import run_command
from microbench.harness.lifecycle import interrupted_exit, raise_on_terminate
try:
    with raise_on_terminate():
        run_command([sys.executable, {str(tmp_path / 'sleeper.py')!r}, {str(tmp_path)!r}], timeout=200,
                    log=Path({str(log)!r}))
except KeyboardInterrupt as e:
    sys.exit(interrupted_exit("test", e))
"""
    proc, err = _terminate(harness, tmp_path, [tmp_path / "pid-x"])
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: test: interrupted by SIGTERM"
    assert (tmp_path / "term-x").read_text() == "SIGTERM"  # asked to stop, not killed outright
    assert not _alive(int((tmp_path / "pid-x").read_text()))
    assert "# interrupted by SIGTERM after" in log.read_text() and "exit 143" in log.read_text()


@pytest.mark.timeout(120)
def test_sigterm_to_a_framework_launch_kills_every_rank_in_its_own_session(tmp_path):
    """``full_model.megatron.run._launch`` starts each rank in a session of its own (so a
    timeout kills a rank's whole tree): nothing from outside reaches them, so the launch must."""
    harness = f"""
import os, sys
from pathlib import Path
from full_model.megatron import run
from microbench.harness.lifecycle import interrupted_exit, raise_on_terminate
try:
    with raise_on_terminate():
        run._launch(None, [sys.executable, {str(tmp_path / 'sleeper.py')!r}, {str(tmp_path)!r}], n=2,
                    env=dict(os.environ), log_path=Path({str(tmp_path / 'train.log')!r}), timeout_s=200)
except KeyboardInterrupt as e:
    sys.exit(interrupted_exit("test", e))
"""
    proc, err = _terminate(harness, tmp_path, [tmp_path / "pid-0", tmp_path / "pid-1"])
    assert proc.returncode == 128 + signal.SIGTERM, err
    pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
    assert [_alive(p) for p in pids] == [False, False]
    assert "full_model.megatron: interrupted by SIGTERM; every rank killed" in (tmp_path / "train.log").read_text()


def test_an_interrupted_grid_keeps_its_rows_and_says_where_it_stopped(tmp_path, monkeypatch):
    """The CSV keeps every configuration that finished; the sidecar names the signal, the
    configuration it stopped in and how many had finished; the interrupt goes on up."""
    import benchmarks.megatron_grid as mg
    import full_model.megatron.setup as setup
    from analysis.crosscheck import CrossCheckError
    from analysis.crosscheck.grid import read_grid
    from microbench.harness.lifecycle import Interrupted
    grid = read_grid(REPO / "benchmarks" / "megatron_grid.yaml")
    seen = []

    def plan(text, cfg, **kw):
        seen.append(text)
        if len(seen) == 1:
            raise CrossCheckError("the first configuration failed")
        raise Interrupted(signal.SIGTERM)
    monkeypatch.setattr(mg, "plan_config", plan)
    monkeypatch.setattr(setup, "framework_identity", lambda source: {})
    csv = tmp_path / "grid.csv"
    with pytest.raises(KeyboardInterrupt):
        mg.run_grid(grid, only=None, source=tmp_path, out=tmp_path / "runs", csv=csv, system="aurora", timeout=10,
                    compute_iters=(1, 0), command="test")
    import pandas as pd
    rows = pd.read_csv(csv)
    assert list(rows["config"]) == [seen[0]] and list(rows["status"]) == ["failed"]
    side = json.loads(csv.with_suffix(".machine.json").read_text())
    assert side["interrupted"] == {"signal": "SIGTERM", "during": seen[1], "completed": 1,
                                   "of": len(grid.order(None, repeat_control=True))}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["spawn", "mpiexec"])
def test_framework_ranks_do_not_outlive_a_sigkilled_command(tmp_path, launcher):
    """SIGKILL cannot be caught: the ranks (or mpiexec, which passes it on) get SIGTERM from the
    kernel when the command that started them dies (PR_SET_PDEATHSIG). Before, a command killed
    by a test's or a scheduler's hard limit left the framework training on (seen 2026-12-04)."""
    from tests.launch import mpiexec
    if launcher == "mpiexec" and mpiexec() is None:
        pytest.skip("no mpiexec (the local extra)")
    rank_cmd = [sys.executable, str(tmp_path / "sleeper.py"), str(tmp_path)]
    cmd = None if launcher == "spawn" else [mpiexec(), "-n", "2", *rank_cmd]
    harness = f"""
import os, sys
from pathlib import Path
from full_model.megatron import run
run._launch({cmd!r}, {rank_cmd!r}, n=2, env=dict(os.environ), log_path=Path({str(tmp_path / 'train.log')!r}),
            timeout_s=200)
"""
    proc, _ = _terminate(harness, tmp_path, [tmp_path / "pid-0", tmp_path / "pid-1"], sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
    end = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    try:
        assert [_alive(p) for p in pids] == [False, False]
        assert [(tmp_path / f"term-{r}").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"]
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_an_error_while_waiting_on_a_probe_ends_it(tmp_path):
    """Any exception while the command waits (here communicate's own ValueError for a NaN limit)
    ends the child before it propagates: before, a NaN --timeout-s left the probe running, orphaned."""
    from analysis.crosscheck.probes import run_command
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    with pytest.raises(ValueError):
        run_command([sys.executable, str(tmp_path / "sleeper.py"), str(tmp_path)], timeout=float("nan"),
                    log=tmp_path / "probe.log")
    mine = str(tmp_path / "sleeper.py").encode()
    left = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if mine in p.read_bytes() and _alive(int(p.parent.name)):
                left.append(int(p.parent.name))
        except OSError:
            continue
    assert left == []
    assert "# stopped by ValueError" in (tmp_path / "probe.log").read_text()
