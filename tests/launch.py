"""Launch probes as real multi-rank runs from tests: embedded world or mpiexec, always bounded."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("PMI_", "OMPI_", "PALS_", "PMIX_", "SLURM_", "MICROBENCH_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    e["MASTER_ADDR"] = "127.0.0.1"
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def run_bounded(cmd: list[str], *, timeout: float, env_: dict[str, str] | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout the whole process group is
    killed (the embedded world's ranks, mpiexec's proxies), so a failing test leaves no orphan
    measuring on; then ``TimeoutExpired`` is raised as usual."""
    with subprocess.Popen(cmd, env=env_, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        finally:
            if proc.poll() is None:
                kill_group(proc)
        kill_group(proc)  # anything the command left behind in its group
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_local(module: str, *args: str, ranks: int = 2, timeout: float = 120,
              **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m module args`` with no launcher: the probe starts its own ``ranks``-rank world."""
    cmd = [sys.executable, "-m", module, *args, "--ranks", str(ranks)]
    return run_bounded(cmd, env_=env(**extra_env), timeout=timeout)


def mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run_mpi(module: str, *args: str, ranks: int = 2, timeout: float = 120,
            **extra_env: str) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python -m module args`` (callers skip when :func:`mpiexec` is None)."""
    exe = mpiexec()
    assert exe is not None
    cmd = [exe, "-n", str(ranks), sys.executable, "-m", module, *args]
    return run_bounded(cmd, env_=env(**extra_env), timeout=timeout)


def have_mpi() -> bool:
    if mpiexec() is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def pids_with(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a test's unique tmp path)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found
