"""Load run directories (and pytest-benchmark JSON) into one pandas DataFrame.

``load("results/")`` reads every run directory below a folder; ``load([a, b])`` several.
Manifest fields that identify a run (host, device, backend, world size, torch version) are
joined onto every row as ``run_*`` columns, so rows from many runs stay distinguishable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from microbench.results import ResultsError, iter_run_dirs, read_run

MANIFEST_COLUMNS = ("hostname", "device", "device_name", "backend", "launcher", "world_size", "model",
                    "start_time")


def _as_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def load_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    manifest, rows = read_run(run_dir)
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


def load(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One DataFrame from run directories, parents of run directories, and benchmark JSON.

    Raises :class:`microbench.results.ResultsError` naming the file and line of any
    malformed input; an unknown schema version is refused, not guessed at.
    """
    frames: list[pd.DataFrame] = []
    dirs: list[Path] = []
    for p in _as_list(paths):
        if p.is_file() and p.suffix == ".json":
            from .bench_json import load_benchmark_json
            frames.append(load_benchmark_json(p))
        else:
            dirs.append(p)
    for d in iter_run_dirs(dirs) if dirs else []:
        frames.append(load_run(d))
    if not frames:
        raise ResultsError(f"no results found in {', '.join(map(str, _as_list(paths)))}")
    return pd.concat(frames, ignore_index=True, sort=False)
