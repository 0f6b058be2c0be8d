"""Load run directories (and pytest-benchmark JSON) into one pandas DataFrame.

``load("results/")`` reads every run directory below a folder; ``load([a, b])`` several.
Manifest fields that identify a run (host, device, backend, world size, torch version) are
joined onto every row as ``run_*`` columns, so rows from many runs stay distinguishable.

What is good is kept, and what is not is said: a torn last line (disk full, a kill
mid-write) is left out and named in ``df.attrs["problems"]`` and a warning; the same run
named twice (same ``run_id``) is loaded once; a run whose manifest was never closed (every
rank died) is ``incomplete`` and refused unless ``allow_incomplete=True`` (or the environment
variable ``MICROBENCH_ALLOW_INCOMPLETE=1``, which reaches the tools built on ``load``).
Each row carries its run's ``run_status`` (ok, failed, interrupted, incomplete) and, for a
failed run, ``run_failure`` (which rank, host, case and why, as JSON).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from microbench.runtime.results import ResultsError, iter_run_dirs, read_run

from analysis.errors import AnalysisError
from analysis.fits import time_s

MANIFEST_COLUMNS = ("hostname", "device", "device_name", "backend", "launcher", "world_size", "model",
                    "start_time", "status", "failure", "ranks_per_node", "cpu_cores_usable", "threads_per_rank")
"""``run_failure`` is the failed run's failure record as JSON (rank, host, probe, case, reason,
``dead_ranks`` …); empty for a run that did not fail."""
ALLOW_INCOMPLETE_ENV = "MICROBENCH_ALLOW_INCOMPLETE"


def _as_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _allow_incomplete(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    text = os.environ.get(ALLOW_INCOMPLETE_ENV, "")
    value = {"": False, "0": False, "false": False, "no": False, "off": False,
             "1": True, "true": True, "yes": True, "on": True}.get(text.strip().lower())
    if value is None:  # "maybe" was read as yes before: only "" and "0" meant no
        raise ResultsError(f"{ALLOW_INCOMPLETE_ENV}={text!r}: not 1 or 0 (true/false, yes/no, on/off)")
    return value


def load_run(run_dir: str | os.PathLike, *, allow_incomplete: bool | None = None,
             problems: list[str] | None = None) -> pd.DataFrame:
    problems = [] if problems is None else problems
    manifest, rows = read_run(run_dir, problems=problems)
    _check_complete(run_dir, manifest, _allow_incomplete(allow_incomplete))
    return _frame(run_dir, manifest, rows)


def _check_complete(run_dir, manifest: dict, allow: bool) -> None:
    if manifest["status"] == "incomplete" and not allow:
        raise ResultsError(f"{run_dir}: incomplete run (its manifest was never closed: every rank "
                           f"died or was killed); --allow-incomplete (load(..., allow_incomplete=True), "
                           f"{ALLOW_INCOMPLETE_ENV}=1) uses its rows anyway")


def _frame(run_dir, manifest: dict, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for key in MANIFEST_COLUMNS:
        value = manifest.get(key)
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        df[f"run_{key}"] = value
    # Measured device peaks (the peak probe's manifest fields), per row dtype where known.
    peaks = manifest.get("peak_tflops")
    if isinstance(peaks, dict) and peaks:
        best = max(peaks.values())
        dtypes = df["dtype"] if "dtype" in df.columns else pd.Series([None] * len(df))
        df["run_peak_tflops"] = [peaks.get(d, best) if isinstance(d, str) else best for d in dtypes]
    elif isinstance(peaks, (int, float)):
        df["run_peak_tflops"] = float(peaks)
    if isinstance(manifest.get("peak_gbps"), (int, float)):
        df["run_peak_gbps"] = float(manifest["peak_gbps"])
    df["run_dir"] = str(run_dir)
    return df


def load(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
         allow_incomplete: bool | None = None) -> pd.DataFrame:
    """One DataFrame from run directories, parents of run directories, and benchmark JSON.

    Raises :class:`microbench.runtime.results.ResultsError` naming the file and line of any
    malformed input; an unknown schema version is refused, not guessed at; an incomplete
    run is refused unless allowed (see the module's docstring). What was left out (a torn
    last line, a run named twice) is in ``df.attrs["problems"]`` and warned about.
    """
    allow = _allow_incomplete(allow_incomplete)
    problems: list[str] = []
    seen: dict[str, Path] = {}
    frames: list[pd.DataFrame] = []
    dirs: list[Path] = []
    for p in _as_list(paths):
        if p.is_file() and p.suffix == ".json":
            from analysis.bench_json import load_benchmark_json
            frames.append(load_benchmark_json(p))
        else:
            dirs.append(p)
    for d in iter_run_dirs(dirs) if dirs else []:
        manifest, rows = read_run(d, problems=problems)
        run_id = manifest.get("run_id")
        if run_id in seen or (run_id is None and d.resolve() in seen.values()):
            problems.append(f"{d}: the same run as {seen.get(run_id, d)} (run_id {run_id}): loaded once")
            continue
        seen[run_id or str(d.resolve())] = d.resolve()
        _check_complete(d, manifest, allow)
        frames.append(_frame(d, manifest, rows))
    if not frames:
        raise ResultsError(f"no results found in {', '.join(map(str, _as_list(paths)))}")
    df = pd.concat(frames, ignore_index=True, sort=False)
    for msg in problems:
        warnings.warn(msg, stacklevel=2)
    df.attrs["problems"] = problems
    return df


PRICED_KINDS = ("gemm", "attention", "memop", "allreduce", "allgather", "reduce_scatter", "alltoall",
                "broadcast", "reduce", "sendrecv")
"""Kinds priced by their time (an overlap row is priced by its exposed fraction)."""
READ_KINDS = (*PRICED_KINDS, "overlap", "host", "tp_sync", "train_step", "train_summary")
"""Every kind a profile reads; a measured sync names its parts joined by '+' (allreduce+allreduce)."""


def select_ok_rows(df, *, include_failed: bool = False):
    """(ok rows, notes). Rows with ``status == 'failed'`` or ``num_wrong > 0`` are refused
    (AnalysisError naming how many and the flag) unless ``include_failed``: then they are
    left out and a note says how many. Skipped rows (not supported there) are left out and
    counted."""
    status = df["status"].fillna("ok") if "status" in df.columns else None
    wrong = df["num_wrong"].fillna(0).astype(float) > 0 if "num_wrong" in df.columns else None
    bad = (status == "failed") if status is not None else None
    if wrong is not None:
        bad = wrong if bad is None else (bad | wrong)
    notes = []
    n_bad = int(bad.sum()) if bad is not None else 0
    if n_bad:
        n_wrong = int(wrong.sum()) if wrong is not None else 0
        what = f"{n_bad} failed row(s) ({n_wrong} with num_wrong > 0)"
        if not include_failed:
            raise AnalysisError(f"profile rows: {what}; a failed case is not a measurement — "
                                f"rerun it, or pass --include-failed to leave them out and price "
                                f"from the rest")
        notes.append(f"left out {what} (--include-failed)")
        df = df[~bad]
    if status is not None:
        keep = df["status"].fillna("ok") == "ok"
        if (~keep).any():
            notes.append(f"left out {int((~keep).sum())} skipped row(s)")
        df = df[keep]
    if "kind" in df.columns and len(df):
        known = df["kind"].map(lambda k: not isinstance(k, str) or all(p in READ_KINDS for p in k.split("+")))
        if (~known).any():  # a corrupted or newer kind: left out, and said so (not priced silently)
            kinds = sorted({str(k) for k in df.loc[~known, "kind"]})
            notes.append(f"left out {int((~known).sum())} row(s) of a kind no profile reads: {', '.join(kinds)}")
            df = df[known]
        priced = df[df["kind"].isin(PRICED_KINDS)]
        if len(priced):
            t = time_s(priced)
            bad_t = ~np.isfinite(t.to_numpy(dtype=float)) | (t.to_numpy(dtype=float) <= 0)
            if bad_t.any():
                first = priced[bad_t].iloc[0]
                raise AnalysisError(f"profile rows: {int(bad_t.sum())} ok row(s) without a finite time > 0 "
                                    f"(first: {first.get('probe') or first.get('kind')} "
                                    f"{first.get('case') or first.get('op')}: "
                                    f"{t[bad_t].iloc[0]!r} s); NaN is wrong, not missing")
    return df, notes
