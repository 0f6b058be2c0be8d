"""Read pytest-benchmark JSON (``pytest --benchmark-only --benchmark-json F``) into probe rows.

One row per benchmark with the probes' column names, so ``analysis.load`` can concatenate
benchmark results with run directories: ``probe='pytest-benchmark'``, ``case`` (the test
name), everything the test put in ``extra_info`` (kind, op, phase, m, n, k, flop,
bytes_moved, dtype, tflops or gbps ...), the timing statistics in µs (``time_us`` is the
median, as the probes' default statistic), ``iters`` (rounds) and ``time_us_samples`` when
the file was written with ``--benchmark-save-data``. Rates missing from ``extra_info`` are
derived from the median (flop → tflops, bytes_moved → gbps).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from microbench.runtime.results import ResultsError
from microbench.runtime.rowcheck import is_amount, is_number, row_problem

STATS_US = {"median": "time_us_median", "mean": "time_us_mean", "min": "time_us_min",
            "max": "time_us_max", "stddev": "time_us_stdev", "iqr": "time_us_iqr"}


def load_benchmark_json(path: str | os.PathLike) -> pd.DataFrame:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ResultsError(f"{p}: not a UTF-8 text file (undecodable byte at offset {e.start}); "
                           "binary or corrupted") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list) \
            or "machine_info" not in doc:
        raise ResultsError(f"{p}: not pytest-benchmark JSON (no 'benchmarks' list and 'machine_info')")
    machine = doc.get("machine_info") or {}
    rows = []
    for i, b in enumerate(doc["benchmarks"]):
        stats = b.get("stats") if isinstance(b, dict) else None
        if not isinstance(stats, dict) or "median" not in stats:
            raise ResultsError(f"{p}: benchmarks[{i}] has no stats.median")
        where = f"{p}: benchmarks[{i}] ({b.get('name')})"
        extra = b.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise ResultsError(f"{where}: extra_info is a {type(extra).__name__}, not an object")
        row = {"probe": "pytest-benchmark", "case": b.get("name"), "status": "ok", "group": b.get("group"), **extra}
        for key, col in STATS_US.items():
            if key in stats:
                v = stats[key]
                if not is_amount(v):
                    raise ResultsError(f"{p}: benchmarks[{i}] ({b.get('name')}): stats.{key} {v!r} is not a "
                                       "finite time ≥ 0 s")
                row[col] = v * 1e6
        if row["time_us_median"] == 0:
            raise ResultsError(f"{p}: benchmarks[{i}] ({b.get('name')}): stats.median 0: a measured "
                               "benchmark takes time")
        row["time_us"] = row["time_us_median"]
        row["statistic"] = "median"
        row["iters"] = stats.get("rounds")
        row["iterations_per_round"] = stats.get("iterations")
        if "data" in stats:
            data = stats["data"] if isinstance(stats["data"], list) else [stats["data"]]
            row["time_us_samples"] = [x * 1e6 if is_number(x) else x for x in data]
        for key in ("flop", "bytes_moved"):  # the rates below are derived from them
            if row.get(key) is not None and not is_amount(row[key]):
                raise ResultsError(f"{where}: extra_info.{key} {row[key]!r} is not a finite number ≥ 0")
        bad = row_problem(row)  # the same checks as a run directory's rows (time, counts, dtype, status)
        if bad:
            raise ResultsError(f"{where}: {bad}")
        t = stats["median"]
        if t > 0 and row.get("flop") and row.get("tflops") is None:
            row["tflops"] = row["flop"] / t / 1e12
        if t > 0 and row.get("bytes_moved") and row.get("gbps") is None:
            row["gbps"] = row["bytes_moved"] / t / 1e9
        rows.append(row)
    df = pd.DataFrame(rows)
    df["run_hostname"] = machine.get("node")
    df["run_device"] = machine.get("cpu", {}).get("brand_raw") if isinstance(machine.get("cpu"), dict) else None
    df["run_start_time"] = doc.get("datetime")
    df["run_dir"] = str(p)
    return df
