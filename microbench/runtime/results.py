"""Results: a run directory with ``manifest.json`` and ``rows.jsonl`` (one JSON object per case).

Rows are appended and flushed as soon as a case ends, so a crash loses nothing already
measured. Only rank 0 writes. JSON only, never pickle.

Row columns (units as suffixes; absent columns are simply missing):

identity   schema_version, run_id, probe, case, status (ok|failed|skipped), reason
operation  op, phase, kind (allreduce|allgather|reduce_scatter|sendrecv|gemm|attention|memop|...),
           dtype, count (elements), size_bytes, m, n, k, batch, flop, bytes_moved, in_place, scale
placement  axis, group_size, num_groups (concurrent), ranks_per_node, crosses_nodes, world_size,
           device, backend
timing     iters, warmup, statistic, time_us (the statistic), time_us_median/_mean/_min/_max/_p95/
           _stdev, time_us_rank_mean (mean over ranks of each rank's median), time_us_samples
           (per iteration, max over ranks), warmup_us_samples
rates      algbw_gbps, busbw_gbps (None for a group of one), tflops, gbps, pct_peak
check      num_wrong, num_checked
extra      anything probe-specific (extrapolation factors, overlap components ...)
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable

from microbench.runtime.rowcheck import is_count, row_problem

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROWS = "rows.jsonl"
ENV_PREFIXES = ("CCL_", "FI_", "NCCL_", "ZE_", "CUDA_", "OMP_", "I_MPI_", "MPICH_", "PALS_", "PBS_",
                "SLURM_JOB", "MASTER_", "TORCH_", "ONEAPI_", "SYCL_")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; the host's count where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def library_versions() -> dict[str, str | None]:
    """torch, oneCCL/IPEX if present, mpi4py and the MPI library's own version string."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    try:
        import torch
        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        nccl = getattr(torch.cuda, "nccl", None)
        if torch.cuda.is_available() and nccl is not None:
            out["nccl"] = ".".join(map(str, nccl.version()))
    except Exception:  # pragma: no cover - torch is a base requirement
        pass
    for mod in ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch", "numpy", "pandas"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    if "mpi4py" in sys.modules:  # never import it here: importing initialises MPI
        mpi4py = sys.modules["mpi4py"]
        out["mpi4py"] = getattr(mpi4py, "__version__", "?")
        try:
            from mpi4py import MPI
            out["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        except Exception:
            pass
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return res.stdout.strip() or None
    except Exception:
        return None


def selected_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def default_out_dir(kind: str) -> Path:
    """``results/<kind>-<time>-<6 hex>``: where every command puts a run it was not told where
    to put (a probe's name, ``campaign``, ``megatron``, ``crosscheck``…), relative to the
    working directory; the random tail keeps two runs started in the same second apart."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"


STATUSES = ("ok", "failed", "interrupted")
"""How a closed manifest says the run ended. ``running`` while it runs; a reader calls a
manifest that was never closed (everyone died) ``incomplete``."""


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The run directory a new run may write: it does not exist yet, or is an empty directory.

    A run directory is written once: an existing run (or anything else) is never appended to
    or overwritten. Raises :class:`ValueError` with one line naming the path.
    """
    d = Path(out_dir)
    if d.exists() or d.is_symlink():
        if not d.is_dir():
            raise ValueError(f"--out {d}: exists and is not a directory")
        if any(d.iterdir()):
            what = "an existing run" if (d / MANIFEST).exists() else "a non-empty directory"
            raise ValueError(f"--out {d}: is {what}; a run directory is written once: "
                             "choose a new path")
    parent = d if d.exists() else d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {d}: {parent} is a file, not a directory")
    if not _writable(parent):
        raise ValueError(f"--out {d}: {parent} is not writable")
    return d


def _writable(path: Path) -> bool:
    """Writable for this user, on a file system mounted read-write (root passes os.access)."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


class RunWriter:
    """Writes one run directory, once. Create on rank 0 only; every method is cheap and flushes.

    The manifest says ``status: running`` until :meth:`close` writes ``ok``, ``failed`` or
    ``interrupted``; rows are appended and fsynced one by one.
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: dict[str, Any]):
        self.dir = check_out_dir(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = manifest.setdefault("run_id", uuid.uuid4().hex[:12])
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        manifest.setdefault("start_time", now_iso())
        manifest.setdefault("command", sys.argv)
        manifest.setdefault("git_commit", git_commit())
        manifest.setdefault("env", selected_env())
        manifest.setdefault("hostname", socket.gethostname())
        manifest["status"] = "running"
        self.manifest = manifest
        self._rows = open(self.dir / ROWS, "x", encoding="utf-8")  # never an existing run's rows
        self._write_manifest()
        self.num_rows = 0

    def _write_manifest(self) -> None:
        write_manifest(self.dir, self.manifest)

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self._write_manifest()

    def write_row(self, row: dict[str, Any]) -> dict[str, Any]:
        full = {"schema_version": SCHEMA_VERSION, "run_id": self.run_id, **row}
        self._rows.write(json.dumps(_jsonable(full)) + "\n")
        self._rows.flush()
        os.fsync(self._rows.fileno())
        self.num_rows += 1
        return full

    @property
    def closed(self) -> bool:
        return self._rows.closed

    def close(self, *, status: str = "ok", **fields: Any) -> None:
        """Close the manifest with its final ``status`` (ok|failed|interrupted) and details."""
        assert status in STATUSES, status
        if self._rows.closed:
            return
        try:
            self._rows.close()
        except OSError:  # disk full on the last flush: the manifest still says how it ended
            pass
        self.update_manifest(end_time=now_iso(), num_rows=self.num_rows, status=status, **fields)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close(status="ok")
        else:
            self.close(status="failed", failure={"reason": f"{type(exc).__name__}: {exc}"})


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically (a private temporary file, then rename): a reader never sees half a manifest,
    and two processes closing the same run (rank 0 and a survivor) never mix their bytes."""
    tmp = run_dir / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(_jsonable(manifest), indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / MANIFEST)


def close_unclosed(run_dir: str | os.PathLike, *, status: str, **fields: Any) -> bool:
    """Close a run whose writer could not (rank 0 died or was killed): done by a surviving
    rank or by the embedded world's parent. A manifest already closed is left as it is.
    Returns True when this call closed it."""
    assert status in STATUSES, status
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("status") not in (None, "running"):
        return False
    rows = Path(run_dir) / ROWS
    try:
        num_rows = sum(1 for line in rows.read_bytes().split(b"\n") if line.strip())
    except OSError:
        num_rows = 0
    manifest.update(end_time=now_iso(), num_rows=num_rows, status=status, **fields)
    write_manifest(Path(run_dir), manifest)
    return True


def current_manifest(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest as it is on disk now (no waiting on a watchdog: what the watchdog and a
    rank closing the run read), or None when it is missing or unreadable."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class ResultsError(ValueError):
    """A results file that cannot be read: the message names the file and line."""


def run_status(manifest: dict[str, Any]) -> str:
    """ok | failed | interrupted, or ``incomplete`` for a manifest never closed."""
    status = manifest.get("status")
    if status in STATUSES:
        return status
    if isinstance(status, str) and status.startswith("error"):  # written by older versions
        return "failed"
    return "incomplete"


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not a UTF-8 text file (undecodable byte at offset {e.start}); "
                           "binary or corrupted") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror}") from None


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: json keeps the last of two equal keys
    without a word, so a row edited or spliced by hand could carry two times and be read by one."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice in one object")
        out[k] = v
    return out


def read_run(run_dir: str | os.PathLike, *, problems: list[str] | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Manifest and rows of one run directory, with the schema checked line by line.

    The manifest's ``status`` is normalised by :func:`run_status` (``incomplete`` when never
    closed). A torn last line (no newline: disk full, or a kill mid-write) is left out and
    reported in ``problems`` as ``file:line``; the good rows are kept. Any other malformed
    line is an error naming file and line.
    """
    d = Path(run_dir)
    mpath, rpath = d / MANIFEST, d / ROWS
    if not mpath.is_file():
        raise ResultsError(f"{d}: not a run directory (no {MANIFEST})")
    try:
        manifest = json.loads(_read_text(mpath), object_pairs_hook=_once)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{mpath}: malformed JSON: {e}") from None
    except ValueError as e:  # a key given twice
        raise ResultsError(f"{mpath}: {e}") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"{mpath}: schema_version {version!r}, this version reads {SCHEMA_VERSION}")
    for key in ("world_size", "ranks_per_node", "num_nodes"):
        v = manifest.get(key)
        if v is not None and not is_count(v, 1):
            raise ResultsError(f"{mpath}: {key} {v!r} is not an integer ≥ 1")
    for key in ("run_id", "probe", "model", "system", "hostname", "device", "device_name", "backend", "launcher"):
        v = manifest.get(key)  # names a run is found and grouped by (a list as run_id: a TypeError)
        if v is not None and not isinstance(v, str):
            raise ResultsError(f"{mpath}: {key} {v!r} is not text")
    if manifest.get("status") == "running":
        manifest = _after_closer(d, manifest, problems)
    manifest["status"] = run_status(manifest)
    rows: list[dict[str, Any]] = []
    if not rpath.is_file():  # a writer makes it before the first case: its absence is damage
        raise ResultsError(f"{rpath}: missing (every run directory has one, empty or not): the run "
                           "directory is damaged or not a run of this tool")
    text = _read_text(rpath)
    lines = text.split("\n")
    torn = not text.endswith("\n") and text != ""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_once)
        except ValueError as e:  # JSONDecodeError, an integer past Python's digit limit, a key given twice
            if not isinstance(e, json.JSONDecodeError):
                raise ResultsError(f"{rpath}:{lineno}: unreadable JSON line ({e}): {line[:80]!r}") from None
            if torn and lineno == len(lines):
                msg = (f"{rpath}:{lineno}: torn last line left out ({len(line)} bytes, no "
                       f"newline: the run was killed or the disk filled mid-write)")
                if problems is not None:
                    problems.append(msg)
                break
            raise ResultsError(f"{rpath}:{lineno}: malformed JSON line ({e.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{rpath}:{lineno}: expected a JSON object, got {line[:80]!r}")
        if row.get("schema_version") != SCHEMA_VERSION:
            raise ResultsError(f"{rpath}:{lineno}: schema_version {row.get('schema_version')!r}, "
                               f"this version reads {SCHEMA_VERSION}")
        bad = row_problem(row, manifest)
        if bad:
            raise ResultsError(f"{rpath}:{lineno}: {bad}")
        rows.append(row)
    return manifest, rows


CLOSER_WAIT_S = 10.0
"""How long a reader waits for a live watchdog that is closing a run (its ranks have ended)."""


def _after_closer(run_dir: Path, manifest: dict[str, Any], problems: list[str] | None) -> dict[str, Any]:
    """A ``running`` manifest whose ranks on this host have all ended while their watchdog still
    lives is being closed right now (:mod:`microbench.runtime.watchdog`): wait for it, bounded, and say
    so in ``problems``. Any other running manifest (a live run, a closer on another host) is
    returned as it is."""
    import time

    from microbench.runtime.procs import ended
    here = socket.gethostname()
    waited = time.monotonic()
    for mark in sorted(run_dir.glob(".watchdog-*.json")):
        try:
            info = json.loads(mark.read_text(encoding="utf-8"))
            pid, host, ranks = int(info["pid"]), str(info["host"]), [int(p) for p in info["ranks"].values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # being written or removed right now
        if host != here or ended(pid) or not all(ended(p) for p in ranks):
            continue
        deadline = waited + CLOSER_WAIT_S
        while not ended(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            fresh = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(fresh, dict):
            manifest = fresh
        if problems is not None:
            state = "closed" if manifest.get("status") != "running" else "still running after"
            problems.append(f"{run_dir}: waited {time.monotonic() - waited:.2f} s for the watchdog on {host} "
                            f"(pid {pid}) to close the run: {state} "
                            f"{'' if state == 'closed' else f'{CLOSER_WAIT_S:g} s'}".rstrip())
        if manifest.get("status") != "running":
            break
    return manifest


def iter_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories named directly, or found one level below a parent directory."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / MANIFEST).is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(c for c in p.iterdir() if (c / MANIFEST).is_file())
            if not found:
                raise ResultsError(f"{p}: no run directory (no {MANIFEST} in it or one level below)")
            out.extend(found)
        elif p.exists():
            raise ResultsError(f"{p}: not a run directory (a file; give the directory holding {MANIFEST})")
        else:
            raise ResultsError(f"{p}: no such run directory")
    return out
