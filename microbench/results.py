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


def default_out_dir(probe: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{probe}-{stamp}-{uuid.uuid4().hex[:6]}"


class RunWriter:
    """Writes one run directory. Create on rank 0 only; every method is cheap and flushes."""

    def __init__(self, out_dir: str | os.PathLike, manifest: dict[str, Any]):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = manifest.setdefault("run_id", uuid.uuid4().hex[:12])
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        manifest.setdefault("start_time", now_iso())
        manifest.setdefault("command", sys.argv)
        manifest.setdefault("git_commit", git_commit())
        manifest.setdefault("env", selected_env())
        manifest.setdefault("hostname", socket.gethostname())
        self.manifest = manifest
        self._write_manifest()
        self._rows = open(self.dir / ROWS, "a", encoding="utf-8")
        self.num_rows = 0

    def _write_manifest(self) -> None:
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(_jsonable(self.manifest), indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.dir / MANIFEST)

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

    def close(self, **fields: Any) -> None:
        if self._rows.closed:
            return
        self._rows.close()
        self.update_manifest(end_time=now_iso(), num_rows=self.num_rows, **fields)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "ok" if exc is None else f"error: {type(exc).__name__}: {exc}"
        self.close(status=status)


class ResultsError(ValueError):
    """A results file that cannot be read: the message names the file and line."""


def read_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Manifest and rows of one run directory, with the schema checked line by line."""
    d = Path(run_dir)
    mpath, rpath = d / MANIFEST, d / ROWS
    if not mpath.is_file():
        raise ResultsError(f"{d}: not a run directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{mpath}: malformed JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"{mpath}: schema_version {version!r}, this version reads {SCHEMA_VERSION}")
    rows: list[dict[str, Any]] = []
    if rpath.is_file():
        for lineno, line in enumerate(rpath.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{rpath}:{lineno}: malformed JSON line ({e.msg}): {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise ResultsError(f"{rpath}:{lineno}: expected a JSON object, got {line[:80]!r}")
            if row.get("schema_version") != SCHEMA_VERSION:
                raise ResultsError(f"{rpath}:{lineno}: schema_version {row.get('schema_version')!r}, "
                                   f"this version reads {SCHEMA_VERSION}")
            rows.append(row)
    return manifest, rows


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
        else:
            raise ResultsError(f"{p}: no such run directory")
    return out
