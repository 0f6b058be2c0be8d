"""The world a rank runs in: its device and backend, the process groups, and the bounded steps
that start torch.distributed (address resolution, the port, the store, the control group).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

from microbench.model.grid import Grid
from microbench.runtime.errors import RendezvousError, RendezvousFailure, UsageError
from microbench.runtime.launch import LaunchInfo, detect_launcher, rendezvous, resolve_world

BACKENDS = ("auto", "xccl", "ccl", "nccl", "gloo", "mpi", "mpi4py")
"""``mpi4py``: torch.distributed still starts (auto backend) for groups and control; probes
that support it move their data through mpi4py on ``World.mpi_comm`` (a second opinion)."""
DEVICES = ("auto", "cpu", "cuda", "xpu")


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


def device_kind(requested: str) -> str:
    """The device kind ``--device`` means here: xpu, then cuda, then cpu for 'auto'; a kind
    that is not available is refused (UsageError)."""
    import torch
    if requested not in DEVICES:
        raise UsageError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    kind = requested
    if requested == "auto":
        kind = "xpu" if has_xpu else "cuda" if torch.cuda.is_available() else "cpu"
    module = getattr(torch, kind, None)
    if kind != "cpu" and (module is None or not module.is_available()):
        raise UsageError(f"--device {kind}: no {kind} device is available on {socket.gethostname()}")
    return kind


def choose_device(requested: str, local_rank: int):
    """(torch.device, device kind) bound by local rank: xpu, then cuda, then cpu for 'auto'."""
    import torch
    kind = device_kind(requested)
    if kind == "cpu":
        return torch.device("cpu"), "cpu"
    module = getattr(torch, kind)
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
        from microbench.runtime.procs import ended
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
    info, comm = resolve_world(info, timeout_s=timeout_s)
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
    if be == "mpi":  # MPI_Init inside holds the GIL: a guard process, not a thread
        from microbench.runtime.guard import guarded
        with guarded(timeout_s, f"error: rank {info.rank} on {socket.gethostname()}: the MPI backend's "
                     f"initialisation did not complete within {timeout_s:g} s: killed by its guard",
                     announce=info.rank == 0):
            dist.init_process_group("mpi", timeout=timeout)
    else:
        addr, port = rendezvous(info, comm, timeout_s=timeout_s)
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
