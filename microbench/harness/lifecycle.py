"""The run's lifecycle: its manifest, its outcome and exit code, signals, and the one way a
rank gives up.

Split from the harness so that what a run leaves on disk when it ends — well or badly — can
be read in one place. The rules (README, "Run directories and exit codes"):

- exit code 0: every case ok; 1: a case failed (a ``failed`` row, or one with
  ``num_wrong > 0``) or a rank died; 2: usage error; 128+N: stopped by signal N.
- the manifest's ``status`` agrees: ``ok``, ``failed`` (with ``failure``: rank, host, probe,
  case, reason) or ``interrupted`` (with ``signal``). It is closed by rank 0, else by a
  surviving rank, else by the embedded world's parent or, under a launcher, by the host's
  watchdog (:mod:`microbench.runtime.watchdog`); a manifest nobody closed is read as
  ``incomplete``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from microbench.runtime import results
from microbench.runtime.world import World

if TYPE_CHECKING:
    from microbench.harness.contract import Context, Probe

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REPORT_WAIT_S = 3.0  # how long rank 0 waits for the other ranks' failure reports


@dataclass
class RunState:
    """What this process knows about the run it belongs to (one per process)."""

    module: str = "microbench"
    rank: int = 0
    world_size: int = 1
    announce: bool = True
    """Print the one-line message on a signal (rank 0 of a launched world; never a rank of the
    embedded world, whose parent prints it)."""
    launched: bool = False
    """A rank of a launcher's world (mpiexec, torchrun, srun), where the launcher signals every
    rank at once and kills the others as soon as one exits (see :func:`install_signal_handlers`)."""
    writer: results.RunWriter | None = None
    run_dir: Path | None = None
    store: Any = None
    """The rendezvous store, where failing ranks leave a report for rank 0."""
    extra: dict[str, Any] = field(default_factory=dict)


RUN = RunState()


def outcome(rows: Sequence[dict[str, Any]]) -> tuple[str, int, dict[str, Any] | None]:
    """(status, exit code, failure) of a run from its rows: any failed row or any row with
    wrong elements makes the run ``failed`` (exit 1), nccl-tests' rule; skipped is not failed."""
    bad = [r for r in rows if r.get("status") == "failed" or (r.get("num_wrong") or 0) > 0]
    if not bad:
        return "ok", EXIT_OK, None
    first = bad[0]
    reason = first.get("reason") or f"{first.get('num_wrong')} wrong element(s)"
    return "failed", EXIT_FAILED, {"probe": first.get("probe"), "case": first.get("case"),
                                   "reason": reason, "num_failed_cases": len(bad),
                                   "num_cases": len(rows)}


def finish(writer: results.RunWriter, rows: Sequence[dict[str, Any]], *, host: str) -> int:
    """Close the manifest with the rows' outcome; the exit code that agrees with it."""
    status, code, failure = outcome(rows)
    if failure is not None:
        failure = {"rank": None, "host": host, **failure}
        writer.close(status=status, failure=failure)
    else:
        writer.close(status=status)
    return code


CLOSE_WAIT_S = 1.0
"""Under a launcher, how long a rank other than 0 that got SIGINT/SIGTERM waits for rank 0 to
close the run before closing it itself (rank 0 may be blocked in a collective)."""
CLOSER = ".closed-by"
"""Created (exclusively) in the run directory by the one rank that closes an interrupted run."""


def install_signal_handlers() -> None:
    """SIGINT/SIGTERM end this rank at once: the run is closed ``interrupted`` by one rank, one
    line is printed, no traceback, exit 128+N. A rank blocked inside a collective runs this when
    the call returns (at the latest after the group timeout); the embedded world's parent does
    not wait that long (it kills, then closes, and prints the line itself).

    Under a launcher every rank gets the signal, and MPICH's Hydra SIGKILLs the others as soon
    as the first one exits: had every rank left at once, rank 0 could be killed before it closed
    the run or printed its line (seen in CI, 1 in 6 tries on a loaded machine). So the ranks
    other than 0 first wait (up to :data:`CLOSE_WAIT_S`) for the run to be closed; rank 0
    closes it at once. Exactly one rank closes it and prints (the one that creates
    ``RUN_DIR/.closed-by``): rank 0, or — when rank 0 is still blocked after the wait — the
    first other rank, which the manifest names as ``interrupted_rank``."""
    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if RUN.launched and RUN.world_size > 1 and RUN.run_dir is not None:
            _close_interrupted_launched(name)
        else:
            marked = False
            if RUN.writer is not None and not RUN.writer.closed:
                try:
                    RUN.writer.close(status="interrupted", signal=name, interrupted_rank=RUN.rank)
                    marked = True
                except OSError:
                    pass
            if RUN.announce:
                _announce(name, RUN.writer.dir if marked else None)
        sys.stdout.flush()
        os._exit(128 + signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) in a command that runs other processes (the cross-check, the grid,
    ``full_model.megatron run``): raised like Ctrl-C's KeyboardInterrupt, so that the code
    waiting on a child can end it and record what was running before the command exits."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def raise_on_terminate():
    """Within it, SIGTERM and SIGHUP (a scheduler's kill, a closed terminal) raise
    :class:`Interrupted` in this process; the handlers before it are restored after. Without it
    Python ends at once, and children in sessions of their own (the framework's ranks) run on
    with nothing to say the run was stopped. Main thread only (Python's signal rule)."""
    def handler(signum: int, _frame) -> None:
        raise Interrupted(signum)
    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)


def interrupt_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def interrupted_exit(module: str, exc: KeyboardInterrupt, where: str = "") -> int:
    """One line for a command stopped by a signal, and its exit code 128+N."""
    signum = getattr(exc, "signum", signal.SIGINT)
    print(f"error: {module}: interrupted by {interrupt_name(exc)}{'; ' + where if where else ''}",
          file=sys.stderr, flush=True)
    return 128 + signum


def end_child(proc: "subprocess.Popen", *, grace_s: float = 5.0) -> None:
    """End a child this process waits on when it is interrupted: SIGTERM (a probe then closes
    its run ``interrupted``, an embedded world ends its ranks), SIGKILL after ``grace_s``."""
    import subprocess
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _announce(signame: str, marked: Path | None) -> None:
    where = f"; run {marked} marked interrupted" if marked is not None else ""
    print(f"error: {RUN.module}: interrupted by {signame}{where}", file=sys.stderr, flush=True)


def _close_interrupted_launched(signame: str) -> None:
    """One rank of a launched world closes the run ``interrupted`` and prints the line; the
    others leave quietly once it is closed (see :func:`install_signal_handlers`)."""
    run_dir = Path(RUN.run_dir)
    if RUN.rank != 0:
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            if (results.current_manifest(run_dir) or {}).get("status") not in (None, "running"):
                return  # closed (by rank 0, or ended anyway): nothing for this rank to say
            time.sleep(0.01)
    try:
        fd = os.open(run_dir / CLOSER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # another rank is closing it
    except OSError:
        fd = None  # the directory is gone or full: say what happened all the same
    if fd is not None:
        os.write(fd, f"{RUN.rank}\n".encode())
        os.close(fd)
    marked = False
    try:
        if RUN.writer is not None and not RUN.writer.closed:
            RUN.writer.close(status="interrupted", signal=signame, interrupted_rank=RUN.rank)
            marked = True
        else:
            marked = results.close_unclosed(run_dir, status="interrupted", signal=signame,
                                            interrupted_rank=RUN.rank)
    except OSError:
        pass
    _announce(signame, run_dir if marked else None)


def usage_exit(error: str | BaseException, *, after_init: bool = False) -> int:
    """Print a usage error once per run (rank 0, or the process with no launcher; for a
    refusal every rank of an MPI launch agreed on, MPI rank 0) and give exit code 2. After
    torch.distributed started, leave with ``os._exit``: a normal exit would destroy live gloo
    threads ("terminate called without an active exception")."""
    from microbench.runtime.launch import LaunchRefused
    if isinstance(error, LaunchRefused):
        RUN.rank = error.mpi_rank
    if RUN.rank == 0:
        print(f"error: {RUN.module}: {error}", file=sys.stderr, flush=True)
    if after_init:
        sys.stdout.flush()
        os._exit(EXIT_USAGE)
    return EXIT_USAGE


def build_manifest(probe: Probe, ctx: Context, argv: Sequence[str]) -> dict[str, Any]:
    w = ctx.world
    man = {"probe": probe.name, "command": [sys.executable, "-m", probe.module, *argv],
           "world_size": w.world_size, "hostnames": w.hostnames, "num_nodes": w.num_nodes,
           "ranks_per_node": w.ranks_per_node, "device": w.device_kind,
           "device_name": device_name(w), "backend": w.backend, "launcher": w.launcher,
           "timeout_s": w.timeout_s, **host_cores(), "grid": {"tp": ctx.grid.tp, "pp": ctx.grid.pp, "dp": ctx.grid.dp},
           "versions": results.library_versions(), "model": ctx.args.model}
    if ctx.cfg is not None:
        import dataclasses
        man["config"] = {"model": dataclasses.asdict(ctx.cfg.model),
                         "parallel": dataclasses.asdict(ctx.cfg.parallel)}
    man.update(probe.manifest(ctx))
    return man


def host_cores() -> dict[str, int]:
    """The cores this process may run on (its affinity) and its torch threads: how many of a
    host's ranks share a core (``analysis.placement.host_sharing``)."""
    import torch
    return {"cpu_cores_usable": results.usable_cores(), "threads_per_rank": torch.get_num_threads()}


def device_name(world: World) -> str:
    import platform
    if world.device_kind == "cpu":
        return platform.processor() or platform.machine()
    module = __import__("torch").__dict__[world.device_kind]
    try:
        return module.get_device_name(world.device)
    except Exception:
        return world.device_kind


def failure_exit(message: str) -> int:
    """A run that could not start (the rendezvous): one line from rank 0, exit 1, leaving at
    once (torch.distributed may hold threads that a normal exit would abort on)."""
    if RUN.rank == 0:
        print(f"error: {RUN.module}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FAILED)


def fail_fast(module: str, ctx: Context, case: str, exc: BaseException) -> None:
    """Name the rank, host, probe and case, keep the rows, and exit without waiting on peers."""
    abort_rank(module, ctx.world, ctx.writer, f"case {case}", exc,
               row={"probe": module.rsplit(".", 1)[-1], "case": case})


PEER_LOST = ("reset by peer", "closed by peer", "Broken pipe")
"""What gloo (and the socket under it) says when the other end of a connection went away: a
rank that fails so was alive when a peer ended (``peer_lost`` in its failure; the host's
watchdog does not name it as the rank that ended first)."""


def abort_rank(module: str, world: World, writer: results.RunWriter | None, what: str,
               exc: BaseException, *, row: dict[str, Any]) -> None:
    """The one way a rank gives up: a line naming module, rank, host and what failed, a
    'failed' row after the rows already written, the manifest closed ``failed``, then exit
    (a collective may be stuck: never wait on a destroy that can hang).

    Every failing rank leaves a report in the rendezvous store; rank 0 waits a moment for
    them, and names the ranks that sent none (they died or were killed). When rank 0 itself
    is gone, a surviving rank closes the manifest instead."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    msg = (f"error: {module}: rank {world.rank} on {world.hostname}: {what} failed: "
           f"{type(exc).__name__}: {text} (a peer may have died or hung; group timeout "
           f"{world.timeout_s:g} s)")
    print(msg, file=sys.stderr, flush=True)
    if os.environ.get("MICROBENCH_DEBUG"):
        traceback.print_exc()
    reported = _report(world.rank, msg)
    failure = {"rank": world.rank, "host": world.hostname, "probe": row.get("probe"),
               "case": row.get("case"), "reason": msg}
    if any(s in str(exc) for s in PEER_LOST):
        failure["peer_lost"] = True  # alive when a peer went: not the rank that ended first
    dead = world.dead_local_peers() if world.pids else []
    if dead:
        failure["dead_ranks"] = dead
    try:  # write first: under MPICH, Hydra SIGKILLs every rank moments after one dies
        if writer is not None:
            try:
                writer.write_row({**row, "status": "failed", "reason": msg})
            except OSError as e:  # disk full: the manifest below still says what happened
                failure["row_not_written"] = f"{type(e).__name__}: {e}"
            writer.close(status="failed", failure=failure)
        elif RUN.run_dir is not None:  # rank 0 may be dead, blocked, or about to be killed
            failure["closed_by_rank"] = world.rank
            if not reported:  # rank 0's store is gone: so is rank 0
                failure["reason"] = f"rank 0 ended without closing the run; {msg}"
            results.close_unclosed(RUN.run_dir, status="failed", failure=failure)
        run_dir = writer.dir if writer is not None else RUN.run_dir
        for _ in range(10 if run_dir is not None and not dead and world.pids else 0):
            time.sleep(0.05)  # a peer's sockets close a moment before its process is gone
            dead = world.dead_local_peers()
            if dead:
                _amend_failure(Path(run_dir), dead_ranks=dead)
                break
        if run_dir is not None and reported:
            for wait_s in (0.5, REPORT_WAIT_S):  # a first answer soon, in case Hydra kills us
                silent = _silent_ranks(world.world_size, world.rank, wait_s=wait_s)
                if silent:  # name the ranks that never reported (died, killed or hung)
                    _name_silent(Path(run_dir), silent, wait_s=wait_s)
    except OSError as e:  # disk full: the message above is all we can leave
        print(f"error: {module}: rank {world.rank}: could not record the failure: {e}",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FAILED)


def _name_silent(run_dir: Path, silent: list[int], *, wait_s: float) -> None:
    """Add the ranks that sent no report to a failed manifest (whoever closed it)."""
    _amend_failure(run_dir, ranks_without_report=silent,
                   silent_reason=(f"rank(s) {', '.join(map(str, silent))} sent no failure report "
                                  f"within {wait_s:g} s: died, killed or hung"))


def _amend_failure(run_dir: Path, **fields: Any) -> None:
    """Add what was learnt after closing to a ``failed`` manifest's failure (whoever closed it)."""
    try:
        manifest = json.loads((run_dir / results.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    failure = manifest.get("failure")
    if manifest.get("status") != "failed" or not isinstance(failure, dict):
        return
    if all(failure.get(k) == v for k, v in fields.items()):
        return
    failure.update(fields)
    results.write_manifest(run_dir, manifest)


def _report(rank: int, msg: str) -> bool:
    """Leave this rank's failure in the store (hosted by rank 0); False when that fails, i.e.
    rank 0 is gone."""
    store = RUN.store
    if store is None:
        return True  # no store (MPI backend): nobody to ask; rank 0 closes if it can
    try:
        store.set_timeout(datetime.timedelta(seconds=2))
        store.set(f"microbench/abort/{rank}", msg)
        return True
    except Exception:  # rank 0 (the store's host) is gone
        return False


def _silent_ranks(world_size: int, me: int, *, wait_s: float) -> list[int]:
    """Ranks that left no failure report within ``wait_s`` (died or were killed)."""
    store = RUN.store
    if store is None or world_size == 1:
        return []
    keys = {r: f"microbench/abort/{r}" for r in range(world_size) if r != me}
    deadline = time.monotonic() + wait_s
    missing = list(keys)
    try:
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([keys[r]])]
            time.sleep(0.1)
    except Exception:
        return []
    return missing
