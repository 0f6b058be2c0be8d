"""Who launched this process, and where rank 0 is: launcher detection, the agreement of every
rank on the launcher's variables, MPI's world (bounded) and the rendezvous address.

Launchers are recognised from their environment (DESIGN.md, Runtime). PALS and PMIx give no
global size, so we ask MPI. We never export ``PMI_RANK``/``PMI_SIZE`` ourselves: on Aurora
that breaks ``MPI_Init``. With no launcher at all the harness starts an embedded local world
(:mod:`microbench.runtime.spawn`).
"""
from __future__ import annotations

import dataclasses
import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from microbench.runtime.errors import RendezvousError, UsageError

EMBEDDED_ENV = "MICROBENCH_EMBEDDED"


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str
    rank: int
    world_size: int | None
    """None where the launcher gives no global size (PALS, PMIx): ask MPI."""
    local_rank: int
    local_size: int | None = None


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {key}={value!r} is not an integer") from None


def _count(text: str | None) -> int | None:
    """A plain count, or None for Slurm's compressed forms such as '2(x3),1'."""
    return int(text) if text and text.isdigit() else None


RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("PMI_RANK", "PMI_SIZE"), ("PALS_RANKID", None), ("PMIX_RANK", None))
"""(rank, size) variables compared for contradictions. Slurm's are left out on purpose:
``SLURM_PROCID`` legitimately differs from the rank when srun starts one torchrun per node
or Hydra's proxies (mpiexec inside an allocation), so a disagreement there proves nothing —
but Slurm's own pair must be self-consistent (a rank inside its world), as every launcher's."""
SELF_CONSISTENT = (*RANK_VARIABLES, ("SLURM_PROCID", "SLURM_NTASKS"))

MPI_LAUNCH_MARKERS = ("PMI_FD", "PMI_PORT", "PMIX_NAMESPACE", "PALS_APID", "OMPI_COMM_WORLD_SIZE")
"""Variables that only a live MPI launch sets (its PMI/PMIx connection, its application id):
where one is present an MPI launcher started this process, and every rank can reach the same
verdict on the environment over MPI (:func:`agreed_launch`)."""


def check_launcher_agreement(env: Mapping[str, str]) -> None:
    """Two launchers' variables that disagree on this process's rank or the world size, or a
    rank outside its own world, are a usage error naming them (a stale ``RANK`` exported in a
    shell, then ``mpiexec``). This is one rank's view: :func:`agreed_launch` makes it every
    rank's."""
    if env.get(EMBEDDED_ENV):
        return
    ranks: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for rank_key, size_key in RANK_VARIABLES:
        if rank_key == "RANK" and "WORLD_SIZE" not in env:
            continue  # a lone RANK is not a launch
        r = _int(env, rank_key)
        if r is not None:
            ranks[rank_key] = r
        n = _int(env, size_key) if size_key else None
        if n is not None:
            sizes[size_key] = n
    for what, seen in (("rank", ranks), ("world size", sizes)):
        if len(set(seen.values())) > 1:
            named = ", ".join(f"{k}={v}" for k, v in seen.items())
            raise UsageError(f"launcher variables disagree on the {what}: {named}; unset the "
                             "stale ones (e.g. a RANK exported in the shell) before launching")
    for rank_key, size_key in SELF_CONSISTENT:
        if rank_key == "RANK" and "WORLD_SIZE" not in env:
            continue
        r, n = _int(env, rank_key), _int(env, size_key) if size_key else None
        if n is not None and (n < 1 or (r is not None and not 0 <= r < n)):
            raise UsageError(f"launcher variables: {rank_key}={r} is outside a world of {size_key}={n}; "
                             "unset the stale ones before launching")


def launched_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank under a launcher, 0 without one or when the variables are bad:
    used to print a usage error once per run, before the launcher is validated."""
    env = os.environ if env is None else env
    try:
        check_launcher_agreement(env)
    except UsageError:
        return 0  # contradictory or out-of-range variables: no rank to trust, so say it
    for key in ("RANK", "PALS_RANKID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def detect_launcher(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launcher that started this process, or None for a bare ``python`` run."""
    env = os.environ if env is None else env
    check_launcher_agreement(env)
    if env.get(EMBEDDED_ENV) or ("RANK" in env and "WORLD_SIZE" in env and
                                  ("LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env)):
        name = "embedded" if env.get(EMBEDDED_ENV) else "torchrun"
        return LaunchInfo(name, _int(env, "RANK") or 0, _int(env, "WORLD_SIZE"),
                          _int(env, "LOCAL_RANK") or 0, _int(env, "LOCAL_WORLD_SIZE"))
    if "PALS_RANKID" in env:
        return LaunchInfo("pals", _int(env, "PALS_RANKID") or 0, None,
                          _int(env, "PALS_LOCAL_RANKID") or 0, _int(env, "PALS_LOCAL_SIZE"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo("openmpi", _int(env, "OMPI_COMM_WORLD_RANK") or 0,
                          _int(env, "OMPI_COMM_WORLD_SIZE"),
                          _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
                          _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"))
    if "PMI_RANK" in env:
        return LaunchInfo("mpich", _int(env, "PMI_RANK") or 0, _int(env, "PMI_SIZE"),
                          _int(env, "MPI_LOCALRANKID") or 0, _int(env, "MPI_LOCALNRANKS"))
    # An srun step (srun --mpi=pmix sets PMIX_RANK too): Slurm knows the local rank.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return LaunchInfo("slurm", _int(env, "SLURM_PROCID") or 0, _int(env, "SLURM_NTASKS"),
                          _int(env, "SLURM_LOCALID") or 0, _count(env.get("SLURM_NTASKS_PER_NODE")))
    if "PMIX_RANK" in env:
        local = _int(env, "PMIX_LOCAL_RANK")
        return LaunchInfo("pmix", _int(env, "PMIX_RANK") or 0, None,
                          local if local is not None else (_int(env, "PALS_LOCAL_RANKID") or 0),
                          _int(env, "PMIX_LOCAL_SIZE"))
    return None


def mpi_world(*, timeout_s: float, announce: bool = True):
    """COMM_WORLD from mpi4py (initialising MPI, bounded), or None when mpi4py is not installed.

    ``MPI_Init`` spins forever, holding the GIL and deaf to SIGTERM, when a peer ended before
    its own ``MPI_Init`` (a rank that refused its arguments, a launcher that died): a guard
    process (:mod:`microbench.runtime.guard`) ends this rank past ``timeout_s``."""
    import importlib.util
    if "mpi4py.MPI" not in sys.modules and importlib.util.find_spec("mpi4py") is None:
        return None
    from microbench.runtime.guard import guarded
    with guarded(timeout_s, f"error: rank {launched_rank()} on {socket.gethostname()}: MPI initialisation "
                 f"did not complete within {timeout_s:g} s (a rank that ended before MPI_Init, or a "
                 "launcher that died?): killed by its guard", announce=announce):
        from mpi4py import MPI
    return MPI.COMM_WORLD


class LaunchRefused(UsageError):
    """A usage error that every rank of an MPI launch agreed on; printed by MPI rank 0 only."""

    def __init__(self, message: str, *, mpi_rank: int):
        super().__init__(message)
        self.mpi_rank = mpi_rank


def agreed_launch(*, timeout_s: float, env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """:func:`detect_launcher`, with every rank reaching the same verdict on the environment.

    One rank's view is not enough: a stale ``RANK=0`` exported in the shell agrees with
    ``PMI_RANK`` on rank 0 only, so rank 1 refuses while rank 0 would go on into ``MPI_Init``
    and spin there forever (its peer never came). Under an MPI launch
    (:data:`MPI_LAUNCH_MARKERS`) every rank therefore initialises MPI first (bounded), and the
    ranks' verdicts are gathered over ``COMM_WORLD`` — the same calls on good and bad ranks: a
    bad environment on any rank is a :class:`LaunchRefused` on every rank, naming the first
    bad rank's variables. Elsewhere (torchrun, srun without PMI, no mpi4py) the verdict is
    this rank's own, and a rank left waiting for a refusing peer is bounded by the rendezvous
    timeout."""
    env = os.environ if env is None else env
    try:
        info, verdict = detect_launcher(env), None
    except UsageError as e:
        info, verdict = None, str(e)
    comm = None
    if not env.get(EMBEDDED_ENV) and any(k in env for k in MPI_LAUNCH_MARKERS):
        comm = mpi_world(timeout_s=timeout_s, announce=verdict is None and launched_rank(env) == 0)
    if comm is None:
        if verdict is not None:
            raise UsageError(verdict)
        return info
    from microbench.runtime.guard import guarded
    with guarded(timeout_s, "", announce=False):
        verdicts = comm.allgather(verdict)
    bad = [(r, v) for r, v in enumerate(verdicts) if v]
    if bad:
        r, v = bad[0]
        raise LaunchRefused(v + (f" (MPI rank {r})" if len(verdicts) > 1 else ""), mpi_rank=comm.Get_rank())
    return info


def resolve_world(info: LaunchInfo, *, timeout_s: float) -> tuple[LaunchInfo, object | None]:
    """Fill a missing world size from MPI; returns the MPI communicator if one was used."""
    comm = None
    if info.launcher in ("pals", "pmix", "openmpi", "mpich", "slurm") or info.world_size is None:
        comm = mpi_world(timeout_s=timeout_s, announce=info.rank == 0)
    if info.world_size is None:
        if comm is None:
            raise UsageError(f"launcher {info.launcher} gives no world size and mpi4py is not "
                             "installed: pip install 'llm-microbench[local]' or use the system mpi4py")
        info = dataclasses.replace(info, world_size=comm.Get_size(), rank=comm.Get_rank())
    return info, comm


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
"""Linux's range of ports handed to outgoing connections and ``bind(0)``."""


def ephemeral_range(path: Path | None = None) -> tuple[int, int] | None:
    """The kernel's ephemeral port range, or None where it cannot be read (not Linux)."""
    try:
        lo, hi = (int(x) for x in (path or EPHEMERAL_RANGE).read_text().split())
    except (OSError, ValueError):
        return None
    return (lo, hi) if 1024 < lo <= hi <= 65535 else None


def free_port(*, tries: int = 64) -> int:
    """A TCP port free now, for a rendezvous that binds it a few seconds later. Taken below
    the kernel's ephemeral range where it has one: a port from ``bind(0)`` lies inside it, where
    any process's outgoing connection (a gloo pair, a pip download) can take it before the
    store binds, which once failed a framework run with EADDRINUSE."""
    host = "127.0.0.1" if os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost") else ""
    span = ephemeral_range()
    if span is not None and span[0] > 20000:
        for _ in range(tries):
            port = random.randrange(20000, span[0])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous(info: LaunchInfo, comm, *, timeout_s: float = 300.0) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT from the environment, else rank 0's host and a free port over MPI
    (a broadcast that a dead peer could hang: guarded)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if port is not None and not port.isdigit():
        raise RendezvousError(f"MASTER_PORT={port!r}: not a TCP port number")
    if addr and port:
        return addr, int(port)
    if comm is None:
        if info.world_size == 1:
            return addr or "127.0.0.1", free_port()
        raise UsageError(f"launcher {info.launcher}: set MASTER_ADDR and MASTER_PORT, or install "
                         "mpi4py so rank 0 can broadcast its address")
    from microbench.runtime.guard import guarded
    mine = (addr or socket.gethostbyname(socket.gethostname()), int(port) if port else free_port())
    with guarded(timeout_s, f"error: rank {info.rank} on {socket.gethostname()}: the rendezvous address "
                 f"was not broadcast over MPI within {timeout_s:g} s: killed by its guard",
                 announce=info.rank == 0):
        addr, port_i = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    return addr, port_i
