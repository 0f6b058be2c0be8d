"""A phase guard: a small process that ends its parent if a blocking call outlives its bound.

Why a process and not a thread: ``from mpi4py import MPI`` (``MPI_Init_thread``) and the MPI
backend's initialisation spin inside C while holding Python's GIL, so no Python thread (and
no Python signal handler) runs until they return — and when a peer died before its own
``MPI_Init`` they never return: the rank spins at full CPU, deaf to SIGTERM, until someone
SIGKILLs it. A separate process does not need the GIL. The parent writes nothing to the
guard's stdin and closes it when the phase is over; the guard exits at that end-of-file (or
when the parent dies, which closes the pipe too). If the bound passes first, the guard prints
its one line (when told to: the run prints a failure once) and SIGKILLs the parent, which
exits with status 128+9. During a guarded phase SIGINT and SIGTERM take their default action
(:func:`default_signals`), so a user's Ctrl-C or a launcher's SIGTERM ends the rank at once.

Where a blocking call releases the GIL (a TCP connect, the store handshake), the thread-based
:func:`microbench.runtime.launch.deadline` bounds it instead and the rank exits 1 with its line.

    python -m microbench.runtime.guard PARENT_PID SECONDS PRINT(0|1) MESSAGE   (started by ``guarded``)
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

GRACE_S = 5.0
"""Slack past the bound before the guard acts (as the thread deadline's)."""


@contextlib.contextmanager
def default_signals() -> Iterator[None]:
    """SIGINT and SIGTERM kill the process outright while C code holds the GIL (a Python handler
    would never run); the previous handlers come back afterwards."""
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def guarded(seconds: float, message: str, *, announce: bool) -> Iterator[None]:
    """Run the block under a guard process: past ``seconds`` (+ :data:`GRACE_S`) the guard
    prints ``message`` (if ``announce``) and SIGKILLs this process."""
    keep = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}  # no launcher variables: not a rank
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), *([env["PYTHONPATH"]] if "PYTHONPATH" in env else [])])
    guard = subprocess.Popen([sys.executable, "-m", "microbench.runtime.guard", str(os.getpid()), repr(seconds + GRACE_S),
                              "1" if announce else "0", message], stdin=subprocess.PIPE, env=env,
                             stdout=subprocess.DEVNULL, close_fds=True)
    try:
        with default_signals():
            yield
    finally:
        assert guard.stdin is not None
        guard.stdin.close()  # end of file: the phase is over
        guard.wait()


SHM_MARK = "/dev/shm/mpich_shm_"
"""MPICH's intra-node shared-memory segments: created in ``MPI_Init`` and unlinked once every
local rank has attached, so a rank killed inside ``MPI_Init`` leaves its segment in RAM."""


def mpi_segments(pid: int) -> list[str]:
    """The MPICH shared-memory files that process ``pid`` maps and that still have a name."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    found = {line.split(None, 5)[5] for line in maps.splitlines()
             if SHM_MARK in line and len(line.split(None, 5)) == 6 and not line.endswith("(deleted)")}
    return sorted(found)


def watch(parent: int, seconds: float, *, announce: bool, message: str) -> int:
    """Wait for end-of-file on stdin or the bound; returns the exit status of the guard. Past
    the bound: SIGKILL the parent and unlink the MPICH segments it mapped (the phase it was
    stuck in is ``MPI_Init``, whose segment nobody else will unlink); the line names them."""
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    if ready:
        return 0  # the parent closed the pipe (or died): nothing to do
    segments = mpi_segments(parent)
    try:
        os.kill(parent, signal.SIGKILL)
    except ProcessLookupError:
        pass
    removed = []
    for path in segments:
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    if announce:
        print(message + (f"; removed its MPI shared memory {', '.join(removed)}" if removed else ""),
              file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str]) -> int:
    try:
        parent, seconds, announce, message = int(argv[0]), float(argv[1]), argv[2] == "1", argv[3]
    except (IndexError, ValueError):
        print("usage: python -m microbench.runtime.guard PARENT_PID SECONDS PRINT(0|1) MESSAGE", file=sys.stderr)
        return 2
    return watch(parent, seconds, announce=announce, message=message)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
