"""Launcher variables left over from another launch (issue 17): every rank reaches the same
verdict, the run ends within its timeout with one line and exit 2, and no process is left.

Before: with a stale ``RANK=0`` under ``mpiexec -n 2`` rank 1 refused at once while rank 0
agreed with its own ``PMI_RANK=0``, went into ``MPI_Init`` and spun there (its peer never
came), deaf to SIGTERM, until SIGKILLed minutes later. Now every rank initialises MPI
(bounded by a guard process) and the verdicts are gathered over ``COMM_WORLD``."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, env, have_mpi, kill_group, mpiexec, pids_with

pytestmark = [pytest.mark.multirank, pytest.mark.mpi,
              pytest.mark.skipif(not have_mpi(), reason="needs mpiexec and mpi4py (the `local` extra)")]

LEFTOVERS = [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29517"}, "RANK=0, PMI_RANK=1"),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "2"}, "SLURM_PROCID=5 is outside a world of SLURM_NTASKS=2"),
    ({"PALS_RANKID": "0", "PALS_LOCAL_RANKID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"},
     "PMI_RANK=1, PALS_RANKID=0"),
]


def _launch(cmd, marker: str, extra: dict[str, str], *, limit_s: float):
    """Run under mpiexec; (exit code, stderr, seconds, processes of the run still alive at exit)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise AssertionError(f"still running after {limit_s:g} s") from None
    took = time.monotonic() - t0
    left = pids_with(marker)
    kill_group(proc)
    return proc.returncode, err, took, left


@pytest.mark.parametrize("extra, named", LEFTOVERS, ids=["torchrun-rank", "slurm-procid", "pals-and-slurm"])
def test_leftover_launcher_variables_end_every_rank_with_one_line(tmp_path, extra, named):
    out = tmp_path / "never-written"
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "microbench.allreduce", "-b", "1K", "-e", "1M",
           "-n", "2", "-w", "1", "--timeout-s", "20", "--out", str(out)]
    code, err, took, left = _launch(cmd, str(out), extra, limit_s=60)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert took < 30, took
    assert left == [], left
    assert not out.exists()  # refused before anything was written


def test_a_rank_stuck_in_mpi_init_is_ended_by_its_guard(tmp_path):
    """A peer that exits before MPI_Init leaves the other rank spinning inside it (GIL held, deaf
    to SIGTERM): the guard process ends it past the bound, naming the phase."""
    script = tmp_path / "stuck_in_mpi_init.py"
    script.write_text("import os, sys\n"
                      "if os.environ['PMI_RANK'] == '1':\n    sys.exit(3)\n"
                      "from microbench.runtime.launch import mpi_world\n"
                      "mpi_world(timeout_s=1)\nprint('MPI initialised', flush=True)\n")
    code, err, took, left = _launch([mpiexec(), "-n", "2", sys.executable, str(script)], str(script), {},
                                    limit_s=60)
    assert code != 0 and "MPI initialisation did not complete within 1 s" in err and "guard" in err, err
    assert took < 1 + 5 + 10, took  # the bound, the guard's grace, and the launcher's clean-up
    assert left == [], left
    # MPICH unlinks its shared-memory segment once every local rank has attached: the rank killed
    # inside MPI_Init left it in /dev/shm (RAM) after every run like this; the guard removes it
    named = re.search(r"removed its MPI shared memory (\S+)", err)
    assert named and named.group(1).startswith("/dev/shm/mpich_shm_"), err
    assert not Path(named.group(1)).exists()


def test_the_guard_unlinks_only_the_mpich_segments_its_rank_maps(tmp_path):
    """The stand-in rank maps an MPICH-named segment and a file of its own, then hangs in a guarded
    phase: past the bound it is killed, the MPICH segment is gone and the other file is kept."""
    seg, own = Path(f"/dev/shm/mpich_shm_test{os.getpid()}_0"), tmp_path / "own.bin"
    script = tmp_path / "hang.py"
    script.write_text("import mmap, sys, time\n"
                      "from microbench.runtime.guard import guarded\n"
                      "maps = []\n"
                      "for p in sys.argv[1:]:\n"
                      "    f = open(p, 'w+b'); f.truncate(4096); maps.append(mmap.mmap(f.fileno(), 4096))\n"
                      "with guarded(0.2, 'error: stuck in the stand-in phase', announce=True):\n"
                      "    print('hanging', flush=True); time.sleep(60)\n")
    try:
        res = subprocess.run([sys.executable, str(script), str(seg), str(own)], capture_output=True, text=True,
                             timeout=30, env=env(), cwd=REPO)
        assert res.returncode == -9, res
        assert res.stderr.strip() == f"error: stuck in the stand-in phase; removed its MPI shared memory {seg}"
        assert not seg.exists() and own.exists()
    finally:
        seg.unlink(missing_ok=True)
