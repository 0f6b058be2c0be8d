"""The embedded local world: no launcher → N copies of the same command on loopback, watched.

A role of its own (as pyperf's ``_manager`` spawns the workers its runner decided on): the
parent starts the ranks, forwards signals, kills what is left after a rank failed and the
others had their timeout, and closes the run directory if no rank could.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from microbench.runtime.launch import EMBEDDED_ENV, free_port


def _die_with_parent() -> None:
    """In a rank of the embedded world (between fork and exec): SIGTERM when the parent dies,
    even by SIGKILL, so no rank outlives it (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op).
    Ctrl-C is ignored until the rank installs its own handler: the parent, which gets it too,
    stops the ranks (no KeyboardInterrupt traceback from a rank still importing torch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    term_with_parent()


def term_with_parent() -> None:
    """Between fork and exec: this child gets SIGTERM when the process that started it dies,
    even by SIGKILL (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op). For children in sessions
    of their own, which nothing else reaches once the parent is gone."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass


def spawn_local_world(module: str, argv: Sequence[str], *, nprocs: int, timeout_s: float,
                      extra_env: Mapping[str, str] | None = None,
                      run_dir: str | os.PathLike | None = None) -> int:
    """Run ``python -m module argv`` as ``nprocs`` ranks on 127.0.0.1; return an exit code.

    If a rank fails, the others get ``timeout_s`` to finish on their own (they will see the
    peer vanish), then are killed; the message names the rank and its exit code. SIGINT or
    SIGTERM to this parent stops every rank (SIGTERM, then SIGKILL after a grace period),
    prints one line and returns 128+N. Ranks die with the parent (no orphans). Afterwards,
    ``run_dir``'s manifest is closed if no rank could close it, and a failure names the
    rank that ended first and how.
    """
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _f: got.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen] = []
    first_failure: int | None = None
    try:
        _start_ranks(procs, module, argv, nprocs=nprocs, extra_env=extra_env)
        first_failure = _watch(procs, got, module=module, timeout_s=timeout_s)
    finally:
        _stop(procs, forward=bool(got))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        return _interrupted(got[0], module=module, nprocs=nprocs, run_dir=run_dir)
    return _agreed_exit_code(procs, first_failure, module=module, run_dir=run_dir)


def _start_ranks(procs: list[subprocess.Popen], module: str, argv: Sequence[str], *, nprocs: int,
                 extra_env: Mapping[str, str] | None) -> None:
    """Start the ranks into ``procs`` (so a failure half-way still stops those started), each
    told its place (RANK, LOCAL_RANK) and the rendezvous on a free port."""
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update({EMBEDDED_ENV: "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)})
    for r in range(nprocs):
        env_r = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env_r,
                                      preexec_fn=_die_with_parent))


def _watch(procs: Sequence[subprocess.Popen], got: list[int], *, module: str, timeout_s: float) -> int | None:
    """Wait for every rank to end, a signal to arrive, or — once a rank failed — the others'
    grace (``timeout_s`` + 10 s) to run out (then they are killed). The rank that failed first."""
    first_failure, deadline_t = None, None
    while not got:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed and first_failure is None:
            first_failure = failed[0]
            deadline_t = time.monotonic() + timeout_s + 10
        if all(c is not None for c in codes):
            break
        if deadline_t is not None and time.monotonic() > deadline_t:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    print(f"error: {module}: rank {r} still running {timeout_s:.0f} s after rank "
                          f"{first_failure} failed; killing it", file=sys.stderr)
                    p.kill()
            break
        time.sleep(0.05)
    return first_failure


def _stop(procs: Sequence[subprocess.Popen], *, forward: bool, grace_s: float = 5.0) -> None:
    """No rank outlives the parent: after a signal each gets SIGTERM (they close the manifest
    'interrupted' if they can) and ``grace_s``; whatever is left is killed and reaped."""
    if forward:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        grace = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < grace:
            time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _interrupted(signum: int, *, module: str, nprocs: int, run_dir: str | os.PathLike | None) -> int:
    """One line, the run closed 'interrupted' if no rank did, exit 128+N."""
    from microbench.runtime import results
    name = signal.Signals(signum).name
    closed = ""
    if run_dir is not None and os.path.isdir(run_dir):
        results.close_unclosed(run_dir, status="interrupted", signal=name)
        closed = f"; run {run_dir} marked interrupted"
    print(f"error: {module}: interrupted by {name}: stopped the {nprocs} rank(s) of the "
          f"embedded world{closed}", file=sys.stderr, flush=True)
    return 128 + signum


def _agreed_exit_code(procs: Sequence[subprocess.Popen], first_failure: int | None, *, module: str,
                      run_dir: str | os.PathLike | None) -> int:
    """The world's exit code: the ranks' own where they agree on 1 (a failed case) or 2 (a
    usage error) — they said why; else every failing rank named, the first one recorded in the
    run, and the largest positive code (1 when every failure was a signal)."""
    codes = [p.returncode for p in procs]
    if first_failure is None:
        return max(codes)
    if len(set(codes)) == 1 and codes[0] in (1, 2):
        return codes[0]
    nprocs = len(procs)
    for r, c in enumerate(codes):
        if c != 0:
            how = f"signal {-c}" if c < 0 else f"exit code {c}"
            print(f"error: {module}: rank {r} of the embedded {nprocs}-rank world ended with {how}",
                  file=sys.stderr)
    if all(c in (0, 2) for c in codes):
        return 2  # a usage error
    c = codes[first_failure]
    ended = {"rank": first_failure, "how": f"signal {signal.Signals(-c).name}" if c < 0 else f"exit code {c}"}
    if run_dir is not None and os.path.isdir(run_dir):
        _record_first_failure(Path(run_dir), ended)
    return max((c for c in codes if c > 0), default=1)


def _record_first_failure(run_dir: Path, ended: dict) -> None:
    """The parent knows which rank ended first and how: close the run if nobody did, and put
    that rank in the failure either way."""
    from microbench.runtime import results
    why = f"rank {ended['rank']} of the embedded world ended with {ended['how']}"
    if not results.close_unclosed(run_dir, status="failed",
                                  failure={"rank": ended["rank"], "reason": why, "first_ended": ended}):
        try:
            man, _ = results.read_run(run_dir)
        except (results.ResultsError, OSError):
            return
        if man.get("status") == "failed":
            failure = dict(man.get("failure") or {})
            failure["first_ended"] = ended
            man["failure"] = failure
            results.write_manifest(run_dir, man)
