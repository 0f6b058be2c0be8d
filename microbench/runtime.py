"""Runtime: who launched us, where is rank 0, which device and backend, which groups.

Launchers are recognised from their environment (DESIGN.md, Runtime). PALS and PMIx give no
global size, so we ask MPI. We never export ``PMI_RANK``/``PMI_SIZE`` ourselves: on Aurora
that breaks ``MPI_Init``. With no launcher at all the harness starts an embedded local world
(:func:`spawn_local_world`): N copies of the same command on loopback, gloo by default.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

EMBEDDED_ENV = "MICROBENCH_EMBEDDED"
BACKENDS = ("auto", "xccl", "ccl", "nccl", "gloo", "mpi", "mpi4py")
"""``mpi4py``: torch.distributed still starts (auto backend) for groups and control; probes
that support it move their data through mpi4py on ``World.mpi_comm`` (a second opinion)."""
DEVICES = ("auto", "cpu", "cuda", "xpu")


class UsageError(ValueError):
    """A bad command-line value: printed as one line, exit code 2."""


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


def detect_launcher(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launcher that started this process, or None for a bare ``python`` run."""
    env = os.environ if env is None else env
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
    if be == "mpi":
        dist.init_process_group("mpi", timeout=timeout)
    else:
        addr, port = rendezvous(info, comm)
        dist.init_process_group(be, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                                world_size=info.world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if be != "gloo" else \
        dist.new_group(list(range(info.world_size)), timeout=timeout)
    names: list[object] = [None] * info.world_size
    dist.all_gather_object(names, socket.gethostname(), group=control)
    return World(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                 launcher=info.launcher, device=dev, device_kind=kind,
                 backend="mpi4py" if measured == "mpi4py" else be,
                 timeout_s=timeout_s, hostnames=[str(n) for n in names], control=control,
                 mpi_comm=comm)


# ---------------------------------------------------------------------------------------------
# Embedded local world: no launcher → start N copies of ourselves on loopback.

def spawn_local_world(module: str, argv: Sequence[str], *, nprocs: int, timeout_s: float,
                      extra_env: Mapping[str, str] | None = None) -> int:
    """Run ``python -m module argv`` as ``nprocs`` ranks on 127.0.0.1; return an exit code.

    If a rank fails, the others get ``timeout_s`` to finish on their own (they will see the
    peer vanish), then are killed; the message names the rank and its exit code.
    """
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update({EMBEDDED_ENV: "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)})
    procs = []
    for r in range(nprocs):
        env_r = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env_r))
    first_failure: int | None = None
    deadline = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                deadline = time.monotonic() + timeout_s + 10
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"error: {module}: rank {r} still running {timeout_s:.0f} s after rank "
                              f"{first_failure} failed; killing it", file=sys.stderr)
                        p.kill()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if first_failure is not None:
        codes = [p.returncode for p in procs]
        for r, c in enumerate(codes):
            if c != 0:
                how = f"signal {-c}" if c < 0 else f"exit code {c}"
                print(f"error: {module}: rank {r} of the embedded {nprocs}-rank world ended with {how}",
                      file=sys.stderr)
        if all(c in (0, 2) for c in codes):
            return 2  # a usage error every rank agreed on
        return max((c for c in codes if c > 0), default=1)
    return max(p.returncode for p in procs)
