"""Runtime: who launched us, where is rank 0, which device and backend, which groups.

Launchers are recognised from their environment (DESIGN.md, Runtime). PALS and PMIx give no
global size, so we ask MPI. We never export ``PMI_RANK``/``PMI_SIZE`` ourselves: on Aurora
that breaks ``MPI_Init``. With no launcher at all the harness starts an embedded local world
(:func:`spawn_local_world`): N copies of the same command on loopback, gloo by default.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

EMBEDDED_ENV = "MICROBENCH_EMBEDDED"
BACKENDS = ("auto", "xccl", "ccl", "nccl", "gloo", "mpi", "mpi4py")
"""``mpi4py``: torch.distributed still starts (auto backend) for groups and control; probes
that support it move their data through mpi4py on ``World.mpi_comm`` (a second opinion)."""
DEVICES = ("auto", "cpu", "cuda", "xpu")


class UsageError(ValueError):
    """A bad command-line value: printed as one line, exit code 2."""


class RendezvousError(UsageError):
    """The rendezvous address cannot be used (unresolvable, port taken): one line, exit 2."""


class RendezvousFailure(RuntimeError):
    """The rendezvous did not complete in time (a rank never came): one line, exit 1."""


@contextlib.contextmanager
def deadline(seconds: float, message: str, *, rank: int):
    """Bound a step that may block in C++ (a TCP connect, a store handshake) where no Python
    exception can reach it: past ``seconds`` (+5 s of slack) print one line (rank 0 only, so
    a run prints it once) and exit 1."""
    def expire() -> None:
        if rank == 0:
            print(f"error: rank {rank} on {socket.gethostname()}: {message}", file=sys.stderr, flush=True)
        os._exit(1)
    timer = threading.Timer(seconds + 5, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def resolve(addr: str, port: int, *, timeout_s: float) -> None:
    """MASTER_ADDR must resolve, within the timeout (a DNS lookup can hang for a minute)."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(_try_resolve(addr, port)), daemon=True)
    t.start()
    t.join(min(timeout_s, 30.0))
    if not box:
        raise RendezvousError(f"MASTER_ADDR={addr!r}: no answer from the resolver within "
                              f"{min(timeout_s, 30.0):g} s")
    if isinstance(box[0], str):
        raise RendezvousError(f"MASTER_ADDR={addr!r} (port {port}): cannot resolve: {box[0]}")


def _try_resolve(addr: str, port: int) -> object:
    try:
        return socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return str(getattr(e, "strerror", None) or e)


def check_port_free(addr: str, port: int) -> None:
    """On rank 0: MASTER_PORT must be free on MASTER_ADDR, else another program would answer
    the other ranks (a foreign listener hangs a rendezvous rather than failing it)."""
    if not 0 < port < 65536:
        raise RendezvousError(f"MASTER_PORT={port}: not a TCP port (1–65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RendezvousError(f"MASTER_ADDR:MASTER_PORT {addr}:{port}: the port is in use by "
                                      "another program; choose a free MASTER_PORT") from None
            # EADDRNOTAVAIL: rank 0 is not on MASTER_ADDR's host: nothing to check here


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
or Hydra's proxies (mpiexec inside an allocation), so a disagreement there proves nothing."""


def check_launcher_agreement(env: Mapping[str, str]) -> None:
    """Two launchers' variables that disagree on this process's rank or the world size are a
    usage error naming them (a stale ``RANK`` exported in a shell, then ``mpiexec``)."""
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
    for rank_key, size_key in RANK_VARIABLES:
        r, n = ranks.get(rank_key), sizes.get(size_key or "")
        if n is not None and (n < 1 or (r is not None and not 0 <= r < n)):
            raise UsageError(f"launcher variables: {rank_key}={r} is outside a world of {size_key}={n}")


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


def _mpi_world():
    """COMM_WORLD from mpi4py, or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def resolve_world(info: LaunchInfo) -> tuple[LaunchInfo, object | None]:
    """Fill a missing world size from MPI; returns the MPI communicator if one was used."""
    comm = None
    if info.launcher in ("pals", "pmix", "openmpi", "mpich", "slurm") or info.world_size is None:
        comm = _mpi_world()
    if info.world_size is None:
        if comm is None:
            raise UsageError(f"launcher {info.launcher} gives no world size and mpi4py is not "
                             "installed: pip install 'llm-microbench[local]' or use the system mpi4py")
        info = dataclasses.replace(info, world_size=comm.Get_size(), rank=comm.Get_rank())
    return info, comm


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1" if os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost") else "", 0))
        return s.getsockname()[1]


def rendezvous(info: LaunchInfo, comm) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT from the environment, else rank 0's host and a free port over MPI."""
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
    mine = (addr or socket.gethostbyname(socket.gethostname()), int(port) if port else free_port())
    addr, port_i = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    return addr, port_i


def choose_device(requested: str, local_rank: int):
    """(torch.device, device kind) bound by local rank: xpu, then cuda, then cpu for 'auto'."""
    import torch
    if requested not in DEVICES:
        raise UsageError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    kind = requested
    if requested == "auto":
        kind = "xpu" if has_xpu else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu"), "cpu"
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        raise UsageError(f"--device {kind}: no {kind} device is available on {socket.gethostname()}")
    index = local_rank % module.device_count()
    module.set_device(index)
    return torch.device(kind, index), kind


def choose_backend(requested: str, device_kind: str) -> str:
    """auto → xccl (native, torch ≥ 2.8) or ccl on XPU, nccl on CUDA, gloo on CPU."""
    import torch.distributed as dist
    if requested not in BACKENDS:
        raise UsageError(f"--backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    backend = requested
    if requested == "auto":
        if device_kind == "xpu":
            backend = "xccl" if _backend_available("xccl") else "ccl"
        else:
            backend = {"cuda": "nccl", "cpu": "gloo"}[device_kind]
    if backend == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  registers the 'ccl' backend
        except ImportError:
            raise UsageError("--backend ccl needs oneccl_bindings_for_pytorch (Intel's package "
                             "index); with torch >= 2.8 on XPU use --backend xccl") from None
    elif backend == "mpi" and not dist.is_mpi_available():
        raise UsageError("--backend mpi: this torch build has no MPI backend")
    elif backend == "nccl" and device_kind != "cuda":
        raise UsageError(f"--backend nccl needs --device cuda, got {device_kind}")
    elif backend in ("xccl", "ccl") and device_kind != "xpu":
        raise UsageError(f"--backend {backend} needs --device xpu, got {device_kind}")
    elif backend == "xccl" and not _backend_available("xccl"):
        raise UsageError("--backend xccl: this torch build has no xccl backend (needs torch >= 2.8 "
                         "built for XPU); try --backend ccl")
    return backend


def _backend_available(name: str) -> bool:
    import torch.distributed as dist
    check = getattr(dist, "is_backend_available", None)
    if check is not None:
        try:
            return bool(check(name))
        except Exception:
            return False
    return getattr(dist, f"is_{name}_available", lambda: False)()


# ---------------------------------------------------------------------------------------------
# Rank grid (Megatron order: tp fastest, then dp, then pp).

AXES = ("tp", "dp", "pp")


@dataclass(frozen=True)
class Grid:
    tp: int
    pp: int
    dp: int

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        return {"tp": rank % self.tp, "dp": (rank // self.tp) % self.dp,
                "pp": rank // (self.tp * self.dp)}

    def rank_of(self, *, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis`` ('tp', 'dp', 'pp' or 'world'), each a sorted rank list."""
        if axis == "world":
            return [list(range(self.size))]
        if axis not in AXES:
            raise UsageError(f"--axis {axis!r}: choose tp, dp, pp or world")
        sizes = {"tp": self.tp, "dp": self.dp, "pp": self.pp}
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                out.append(sorted(self.rank_of(**{**fixed, axis: v}) for v in range(sizes[axis])))
        return sorted(out)


@dataclass
class World:
    """Everything a probe needs to know about the process it runs in."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    device: object
    device_kind: str
    backend: str
    timeout_s: float
    hostnames: list[str]
    control: object = None
    """A gloo group over all ranks, for barriers and timing reductions (never measured)."""
    mpi_comm: object = None
    store: object = None
    """The rendezvous store (None under the MPI backend): where failing ranks leave reports."""
    pids: list[int] = field(default_factory=list)
    """Every rank's process id: a failing rank names the peers on its host that are gone."""
    _groups: dict = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.hostnames[self.rank]

    @property
    def num_nodes(self) -> int:
        return len(set(self.hostnames))

    @property
    def ranks_per_node(self) -> int:
        return self.hostnames.count(self.hostname)

    def dead_local_peers(self) -> list[int]:
        """Ranks on this host whose process has ended (gone or a zombie): who died, at once,
        without waiting for a report a SIGKILLed rank cannot send."""
        from .watchdog import ended
        return [r for r, pid in enumerate(self.pids)
                if r != self.rank and self.hostnames[r] == self.hostname and ended(pid)]

    def crosses_nodes(self, ranks: Sequence[int]) -> bool:
        return len({self.hostnames[r] for r in ranks}) > 1

    def group(self, ranks: Sequence[int]):
        """The process group over ``ranks``; call in the same order on every rank.

        Groups are cached. ``dist.new_group`` must be called by every rank for every group,
        so :meth:`groups_for` creates all groups of an axis at once.
        """
        import torch.distributed as dist
        key = tuple(ranks)
        if key not in self._groups:
            if len(key) == self.world_size and key == tuple(range(self.world_size)):
                self._groups[key] = dist.group.WORLD
            else:
                self._groups[key] = dist.new_group(list(key), timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._groups[key]

    def groups_for(self, grid: Grid, axis: str) -> tuple[list[list[int]], list[int], object]:
        """All groups of an axis (created on every rank), this rank's members and its group."""
        all_groups = grid.groups(axis)
        mine = None
        for ranks in all_groups:
            g = self.group(ranks)
            if self.rank in ranks:
                mine = (ranks, g)
        assert mine is not None
        return all_groups, mine[0], mine[1]


def init_world(*, device: str = "auto", backend: str = "auto", timeout_s: float = 300.0) -> World:
    """Initialise torch.distributed for the current launcher and return the World."""
    import torch.distributed as dist
    info = detect_launcher()
    if info is None:  # a plain single process (the embedded launcher's parent never gets here)
        info = LaunchInfo("none", 0, 1, 0, 1)
    info, comm = resolve_world(info)
    dev, kind = choose_device(device, info.local_rank)
    if kind == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a node share its cores: oversubscribed threads make CPU timings noise.
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info.local_size or 1)))
    measured = backend
    if backend == "mpi4py":
        if comm is None:
            raise UsageError(f"--backend mpi4py needs an MPI launcher (mpiexec); launcher "
                             f"{info.launcher} gives no MPI communicator")
        backend = "auto"
    be = choose_backend(backend, kind)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    if be == "mpi":
        with deadline(timeout_s, f"MPI initialisation did not complete within {timeout_s:g} s",
                      rank=info.rank):
            dist.init_process_group("mpi", timeout=timeout)
    else:
        addr, port = rendezvous(info, comm)
        where = f"{addr}:{port} (MASTER_ADDR:MASTER_PORT)"
        resolve(addr, port, timeout_s=timeout_s)
        if info.rank == 0:
            check_port_free(addr, port)
        with deadline(timeout_s, f"rendezvous at {where} did not complete within {timeout_s:g} s "
                      "(another program listening there, or a rank that never started?)",
                      rank=info.rank):
            try:
                store = dist.TCPStore(addr, port, info.world_size, info.rank == 0, timeout=timeout,
                                      wait_for_workers=False)
                dist.init_process_group(be, store=store, rank=info.rank, world_size=info.world_size,
                                        timeout=timeout)
            except (RuntimeError, OSError) as e:  # DistStoreError, a refused connection
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise RendezvousFailure(f"rendezvous at {where} did not complete within "
                                        f"{timeout_s:g} s ({type(e).__name__}: {first[:160]})") from None
    with deadline(timeout_s, f"the control group did not form within {timeout_s:g} s", rank=info.rank):
        control = dist.new_group(backend="gloo", timeout=timeout) if be != "gloo" else \
            dist.new_group(list(range(info.world_size)), timeout=timeout)
    names: list[object] = [None] * info.world_size
    dist.all_gather_object(names, (socket.gethostname(), os.getpid()), group=control)
    return World(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                 launcher=info.launcher, device=dev, device_kind=kind,
                 backend="mpi4py" if measured == "mpi4py" else be,
                 timeout_s=timeout_s, hostnames=[str(n[0]) for n in names], control=control,
                 mpi_comm=comm, store=store, pids=[int(n[1]) for n in names])


# ---------------------------------------------------------------------------------------------
# Embedded local world: no launcher → start N copies of ourselves on loopback.

def _die_with_parent() -> None:
    """In a rank of the embedded world (between fork and exec): SIGTERM when the parent dies,
    even by SIGKILL, so no rank outlives it (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op).
    Ctrl-C is ignored until the rank installs its own handler: the parent, which gets it too,
    stops the ranks (no KeyboardInterrupt traceback from a rank still importing torch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    from . import results
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update({EMBEDDED_ENV: "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)})
    got: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _f: got.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    procs = []
    first_failure: int | None = None
    try:
        for r in range(nprocs):
            env_r = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env_r,
                                          preexec_fn=_die_with_parent))
        deadline_t = None
        while True:
            if got:
                break
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
    finally:
        if got:  # stop the ranks: they close the manifest 'interrupted' if they can
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            grace = time.monotonic() + 5
            while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        name = signal.Signals(got[0]).name
        closed = ""
        if run_dir is not None and os.path.isdir(run_dir):
            results.close_unclosed(run_dir, status="interrupted", signal=name)
            closed = f"; run {run_dir} marked interrupted"
        print(f"error: {module}: interrupted by {name}: stopped the {nprocs} rank(s) of the "
              f"embedded world{closed}", file=sys.stderr, flush=True)
        return 128 + got[0]
    codes = [p.returncode for p in procs]
    if first_failure is not None and len(set(codes)) == 1 and codes[0] in (1, 2):
        return codes[0]  # every rank agreed (a failed case, a usage error): they said why
    if first_failure is not None:
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
    return max(p.returncode for p in procs)


def _record_first_failure(run_dir: Path, ended: dict) -> None:
    """The parent knows which rank ended first and how: close the run if nobody did, and put
    that rank in the failure either way."""
    from . import results
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
