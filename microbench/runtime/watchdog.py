"""The run's last witness on a host, for launchers that kill every rank when one dies.

Under MPICH's Hydra (and Open MPI's ``mpirun``, and ``srun --kill-on-bad-exit``) a rank that
dies makes the launcher SIGKILL every other rank a fraction of a second later. A surviving
rank often closes the manifest in that fraction of a second (``lifecycle.abort_rank``), but
not always: when the kill wins, nobody is left to say which rank died and the run reads as
``incomplete``. So the lowest rank on each host starts one watchdog: a small process in a
session of its own (the launcher's kill does not reach it) that polls the host's ranks and
notes which one ended first. When every rank on its host has ended it looks at the
manifest:

- still ``running`` (nobody closed it): it closes it ``failed``, naming the rank that ended
  first (``first_ended``, ``dead_ranks``) where that can be told: by the kernel's order of
  exits (process descriptors in an ``epoll`` set, even when the watchdog woke late on a
  loaded host), else (polling) when that rank was seen ended clearly before the others;
- ``failed`` by a rank that gave up mid-run (a survivor's failure, which names the peers it
  found ended when it looked, ``dead_ranks``: by then the launcher may have killed more):
  it adds ``first_ended``, leaving out the survivor itself when it lost a peer while alive
  (``peer_lost``: a killed rank closes its sockets before the kernel reports its exit);
- anything else (``ok``, ``interrupted``, a run that completed with a failed case, or a
  failure that already says who ended first): it leaves the manifest alone.

Last, it unlinks the MPICH shared-memory segments its ranks had mapped (read when it
started) that no process maps any more: ranks that end without ``MPI_Finalize`` (killed,
interrupted, failed) cannot, and the files would stay in RAM; the manifest lists them
(``removed_shm``).

It never outlives its ranks by more than a moment, reads no tensors, imports no torch, and
ends by itself. Across hosts it assumes a shared run directory (as the writer does). The
embedded world needs none: its parent process is the witness there.

So that a run is closed when the launcher returns, the watchdog holds the rank's standard
error open until it has concluded: MPICH's Hydra (like most launchers that forward output)
returns only at end-of-file on every rank's output, so ``mpiexec …; cat RUN/manifest.json``
reads the final status. Where a launcher does not wait for that, the watchdog's marker
``RUN_DIR/.watchdog-HOST.json`` (its pid and its ranks', removed when it ends) lets a reader
on the same host wait for it, bounded (:func:`microbench.runtime.results.read_run`).

    python -m microbench.runtime.watchdog RUN_DIR HOST RANK:PID [RANK:PID ...] [shm=PATH ...]   (started by the harness)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from microbench.runtime.procs import ended

POLL_S = 0.02
"""Polling period where the kernel offers no process descriptors (``os.pidfd_open``)."""
CLEAR_S = 0.001
"""Where the order of exits is not known within a wake-up (polling), the first rank to end is
named only if the next one was seen ended at least this much later."""


def watch(ranks: dict[int, int], *, poll_s: float = POLL_S,
          on_ready: Callable[[], None] | None = None) -> tuple[dict[int, float], bool]:
    """Wait until every rank's process has ended. Returns when each was seen ended (the
    watchdog's wake-up), in the order they ended, and whether that order is the kernel's.
    ``on_ready`` is called once every rank is watched.

    With process descriptors (``pidfd_open``, Linux ≥ 5.3) in an ``epoll`` set, each exit wakes
    the watchdog, and when several ranks ended before it was scheduled (a loaded host: the
    launcher's kill of the others can come before the watchdog runs) ``epoll`` still returns
    them in the order they ended: its ready list is first-in, first-out. Ranks that had ended
    before they were watched have no known order among themselves (the starting rank waits
    for ``on_ready`` so that, normally, none has). Without process descriptors it polls, and
    ranks seen in one poll have no known order."""
    import select
    gone: dict[int, float] = {}
    fds: dict[int, int] = {}
    try:
        for r, pid in ranks.items():
            try:
                fds[os.pidfd_open(pid)] = r
            except ProcessLookupError:  # already gone
                gone[r] = time.monotonic()
    except (AttributeError, OSError):  # no process descriptors here: poll instead
        for fd in fds:
            os.close(fd)
        if on_ready is not None:
            on_ready()
        return _watch_polling(ranks, gone, poll_s=poll_s), False
    waiter = select.epoll()
    try:
        for fd in fds:
            waiter.register(fd, select.EPOLLIN)
        now = time.monotonic()
        for fd, _ in waiter.poll(0):  # ended before they were watched: no known order
            gone.setdefault(fds.pop(fd), now)
            waiter.unregister(fd)
            os.close(fd)
        ordered = len(gone) <= 1
        if on_ready is not None:
            on_ready()
        while fds:
            events = waiter.poll(-1, len(fds))
            now = time.monotonic()
            for fd, _ in events:
                gone.setdefault(fds.pop(fd), now)
                waiter.unregister(fd)
                os.close(fd)
    finally:
        waiter.close()
        for fd in fds:
            os.close(fd)
    return gone, ordered


def _watch_polling(ranks: dict[int, int], gone: dict[int, float], *, poll_s: float) -> dict[int, float]:
    while True:
        now = time.monotonic()
        for r, pid in ranks.items():
            if r not in gone and ended(pid):
                gone[r] = now
        if len(gone) == len(ranks):
            return gone
        time.sleep(poll_s)


def first_to_end(gone: dict[int, float], *, ordered: bool = False, clear_s: float = CLEAR_S) -> int | None:
    """The rank that ended first, or None when that cannot be told. ``gone`` is in the order
    the ranks ended where ``ordered`` (the kernel's, from :func:`watch`): the first one is
    named even when the watchdog saw several in one wake-up. Otherwise only a rank seen ended
    at least ``clear_s`` before every other one is named."""
    order = sorted(gone.items(), key=lambda kv: kv[1])  # stable: a wake-up keeps the kernel's order
    if not order:
        return None
    if len(order) > 1 and order[1][1] - order[0][1] < clear_s and not ordered:
        return None
    return order[0][0]


def conclude(run_dir: Path, host: str, gone: dict[int, float], *, ordered: bool = False,
             settle_s: float = 0.3) -> str:
    """Close or amend the manifest from what was seen (``gone`` and ``ordered`` as
    :func:`watch` returns them); returns what was done (for tests). A ``failed`` manifest is
    amended only when a rank gave up mid-run (``abort_rank``'s failure; a run that completed
    with a failed case has ``num_cases`` and ends normally)."""
    from microbench.runtime import results
    manifest = results.current_manifest(run_dir)
    if manifest is not None and manifest.get("status") in ("ok", "interrupted"):
        return "left"  # closed normally: nothing to wait for
    time.sleep(settle_s)  # a surviving rank on another host may be closing it right now
    first = first_to_end(gone, ordered=ordered)
    manifest = results.current_manifest(run_dir)
    if manifest is None:
        return "no manifest"
    status = manifest.get("status")
    if status in (None, "running"):
        if first is None:
            why = (f"every rank on {host} ({', '.join(map(str, sorted(gone)))}) ended together "
                   f"(within {CLEAR_S * 1e3:g} ms, and the order of exits is not known here: which "
                   "one died first cannot be told) without closing the run")
            failure = {"rank": None, "host": host, "reason": why}
        else:
            why = (f"rank {first} on {host} ended first, {_how_first(gone, first)}, and nobody "
                   "closed the run (the launcher killed the others)")
            failure = {"rank": first, "host": host, "reason": why, "dead_ranks": [first],
                       "first_ended": _first_ended(gone, first, host)}
        failure["closed_by"] = f"watchdog on {host}"
        return "closed" if results.close_unclosed(run_dir, status="failed", failure=failure) else "left"
    failure = manifest.get("failure")
    if status != "failed" or not isinstance(failure, dict) or "first_ended" in failure or "num_cases" in failure:
        return "left"
    survivor = failure.get("rank") if failure.get("peer_lost") else None
    left_out = survivor in gone
    if left_out:
        # the rank that closed it lost a peer while alive: its exit (voluntary, and notified
        # as soon as it ends) can come before the killed peer's (notified only when its whole
        # thread group has gone), so the first is sought among the others
        gone = {r: t for r, t in gone.items() if r != survivor}
        first = first_to_end(gone, ordered=ordered)
    if first is None:
        return "left"
    failure["first_ended"] = _first_ended(gone, first, host)
    if left_out:
        failure["first_ended"]["how"] += f" (rank {survivor} left out: it lost a peer while alive)"
    results.write_manifest(run_dir, manifest)
    return "amended"


def _first_ended(gone: dict[int, float], first: int, host: str) -> dict[str, object]:
    """As the embedded world's parent records it: which rank ended first, and how that is known."""
    return {"rank": first, "how": f"ended first on {host}, {_how_first(gone, first)} (seen by the watchdog)"}


def _how_first(gone: dict[int, float], first: int) -> str:
    others = [t for r, t in gone.items() if r != first]
    if not others:
        return "the only rank there"
    gap = min(others) - gone[first]
    if gap > 0:
        return f"{gap * 1e3:.1f} ms before any other rank there" if gap < 1 else f"{gap:.2f} s before any other rank there"
    together = sum(1 for t in gone.values() if t == gone[first])
    return (f"in the kernel's order of exits (the watchdog woke after {together} ranks there had "
            "ended, so by how much is not known)")


START_WAIT_S = 10.0
"""How long the starting rank waits for its watchdog to be watching before the first case."""


def start(run_dir: Path, *, rank: int, hostnames: Sequence[str], pids: Sequence[int]) -> bool | None:
    """Start the host's watchdog if this rank is the lowest on its host (no-op otherwise), and
    wait (up to :data:`START_WAIT_S`) until it watches every rank on the host: a rank that
    dies in the first case then ends while watched, and the order of exits is known. Passes
    the MPICH segments this rank maps (it has passed ``MPI_Init``; see
    :func:`remove_orphan_segments`). Returns None where this rank starts none, else whether its
    watchdog is watching."""
    import select
    import subprocess
    host = hostnames[rank]
    local = [r for r, h in enumerate(hostnames) if h == host]
    if rank != min(local) or len(pids) != len(hostnames):
        return None
    # a clean environment: no launcher variables (nothing should take it for a rank)
    keep = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), *([env["PYTHONPATH"]] if "PYTHONPATH" in env else [])])
    # stderr inherited and held until it concludes: the launcher returns after the run is closed;
    # stdout: one line, "watching", once it watches every rank
    proc = subprocess.Popen([sys.executable, "-m", "microbench.runtime.watchdog", str(Path(run_dir).resolve()), host,
                             *(f"{r}:{pids[r]}" for r in local), *(f"shm={p}" for p in sorted(mapped_segments("self")))],
                            env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            close_fds=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], START_WAIT_S)
        return bool(ready) and proc.stdout.readline().strip() == b"watching"
    finally:
        proc.stdout.close()


SEGMENT_PREFIX = "/dev/shm/mpich_shm_"
"""MPICH's node-local shared-memory segments: created at ``MPI_Init`` and unlinked at
``MPI_Finalize``, so ranks that end without it (killed by the launcher, interrupted, or leaving
with ``os._exit`` after a failure) leave them in RAM: 185 files, 496 MB, on this VM after a
day of fault tests."""


def mpi_segments(pids: Sequence[int]) -> set[str]:
    """The MPICH segments these processes map now (besides those the starting rank passed:
    the ranks have passed ``MPI_Init``)."""
    found: set[str] = set()
    for pid in pids:
        found |= mapped_segments(pid)
    return found


def mapped_segments(pid: int | str) -> set[str]:
    """The MPICH segments process ``pid`` (or ``"self"``) maps and that still have a name."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            fields = (line.rstrip("\n").split(maxsplit=5) for line in f if SEGMENT_PREFIX in line)
            return {x[5] for x in fields if len(x) == 6 and not x[5].endswith(" (deleted)")}
    except OSError:  # gone, or not ours (then it cannot map our 0600 segments either)
        return set()


def remove_orphan_segments(paths: set[str]) -> list[str]:
    """Unlink those of ``paths`` that still exist and that no process maps: after every rank on
    the host has ended, what they could not unlink themselves. Returns what was removed."""
    left = sorted(p for p in paths if p.startswith(SEGMENT_PREFIX) and os.path.exists(p))
    if not left:
        return []
    in_use: set[str] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            in_use |= mapped_segments(entry)
    removed = []
    for p in left:
        if p in in_use:
            continue
        try:
            os.unlink(p)
        except OSError:
            continue
        removed.append(p)
    return removed


def _record_removed(run_dir: Path, removed: list[str]) -> None:
    """Say so in the manifest (``removed_shm``, as ``full_model.megatron run`` does)."""
    from microbench.runtime import results
    manifest = results.current_manifest(run_dir)
    if manifest is None or not removed:
        return
    manifest["removed_shm"] = sorted(set(manifest.get("removed_shm") or []) | set(removed))
    try:
        results.write_manifest(run_dir, manifest)
    except OSError:
        pass


def marker(run_dir: Path, host: str) -> Path:
    """Where a live watchdog says who it is and whom it watches (see the module docstring)."""
    return Path(run_dir) / f".watchdog-{host}.json"


def main(argv: Sequence[str]) -> int:
    usage = "usage: python -m microbench.runtime.watchdog RUN_DIR HOST RANK:PID [RANK:PID ...] [shm=PATH ...]"
    try:
        run_dir, host, *rest = argv
        segments = {x[len("shm="):] for x in rest if x.startswith("shm=")}
        ranks = {int(r): int(p) for r, p in (x.split(":") for x in rest if not x.startswith("shm="))}
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    if not ranks:
        print(usage, file=sys.stderr)
        return 2
    import json
    mark = marker(Path(run_dir), host)
    written: list[Path] = []

    def ready() -> None:
        """Say where this watchdog is (for readers) and tell the starting rank to go on."""
        try:
            mark.write_text(json.dumps({"pid": os.getpid(), "host": host, "ranks": ranks}), encoding="utf-8")
            written.append(mark)
        except OSError:
            pass  # the run directory is gone or full: watch anyway
        try:
            print("watching", flush=True)
        except OSError:
            pass  # the starting rank stopped waiting
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # nothing more for the starting rank, which closes its end
        os.close(devnull)

    segments |= mpi_segments(list(ranks.values()))
    try:
        gone, ordered = watch(ranks, on_ready=ready)
        conclude(Path(run_dir), host, gone, ordered=ordered)
        _record_removed(Path(run_dir), remove_orphan_segments(segments))
    finally:
        for m in written:
            m.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
