"""What a results row's known fields must be: the check every row passes as it is read
(:func:`microbench.runtime.results.read_run` names the file and line of the first it fails)."""
from __future__ import annotations

import math
from typing import Any

ROW_STATUSES = ("ok", "failed", "skipped")
"""How a row says its case ended (a case's status; a run's is :data:`microbench.runtime.results.STATUSES`)."""
ROW_DTYPES = ("bf16", "fp16", "fp32", "fp64", "int32", "int64")
"""The dtype names a row carries (microbench.harness.options.CANONICAL_DTYPE's values); a case
over buffers of several dtypes joins them with '+'."""
_COUNTS = {"m": 1, "n": 1, "k": 1, "batch": 1, "world_size": 1, "iters": 1, "warmup": 0, "bytes": 0,
           "num_wrong": 0, "num_checked": 0, "size_bytes": 0, "count": 0, "elements": 0, "group_size": 1,
           "num_groups": 1, "ranks_per_node": 1, "flop": 0, "flop_causal": 0, "bytes_moved": 0, "bytes_step": 0,
           "bytes_per_pair": 0}
"""Integer fields of a row and their least value."""


_TEXT = ("probe", "case", "kind", "op", "phase", "path", "axis", "place", "statistic", "timing", "mode", "variant",
         "recompute", "norm", "link", "layout", "backend", "device", "redop", "collective_name", "concurrent")
"""Fields a row names something with: text where present (a list or a number there broke the
profile's grouping with a TypeError)."""
_QUANTITIES = ("bus_bytes", "tflops", "tflops_causal", "gbps", "algbw_gbps", "busbw_gbps", "busbw_factor", "pair_gbps",
               "gemm_gflop", "ops_us", "pct_peak", "scale", "extrapolation")
"""Fields the profile computes with that cannot be negative: finite numbers ≥ 0 where present."""
_SIGNED = ("host_us", "exposed_fraction")
"""Fields that may come out below 0 from noise (a phase less its operations; overlap): finite."""


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_amount(v: Any, *, signed: bool = False) -> bool:
    """A finite number (not a bool), ≥ 0 unless ``signed``: a time, a rate, a size."""
    return is_number(v) and math.isfinite(v) and (signed or v >= 0)


def is_count(v: Any, least: int) -> bool:
    """A whole number from ``least`` up to int64's range (a column of them is int64 in pandas;
    a byte count of 1e308 passed as whole and overflowed the α–β fit)."""
    return is_number(v) and float(v).is_integer() and least <= v < 2 ** 63


def row_problem(row: dict[str, Any], manifest: dict[str, Any] | None = None) -> str | None:
    """What is wrong with one row's known fields (None when nothing is): its status is one of
    :data:`ROW_STATUSES` and its dtype one of :data:`ROW_DTYPES`; its world size is its run's
    (the manifest's, where both say); a count (``m``, ``bytes``, ``world_size`` …) is an integer at least its
    least value; every ``time_us*`` figure and sample is a finite number ≥ 0 (a median or mean
    within the row's own min and max), and an ``ok`` row's ``time_us`` is > 0 (a measured case
    took time); the fields it names things with are text and the quantities it computes with
    finite numbers (≥ 0 but for :data:`_SIGNED`). Fields it does not know are left alone."""
    status = row.get("status")
    if "status" in row and status not in ROW_STATUSES:
        return f"status {status!r} is not one of {', '.join(ROW_STATUSES)}"
    dtype = row.get("dtype")
    if "dtype" in row and not (isinstance(dtype, str) and all(d in ROW_DTYPES for d in dtype.split("+"))):
        # a case over several buffers names each dtype (dp_allreduce's measured sync: fp32+bf16)
        return f"dtype {dtype!r} is not one of {', '.join(ROW_DTYPES)} (or several joined by '+')"
    for key, least in _COUNTS.items():
        if key in row and row[key] is not None:
            if not is_count(row[key], least):
                return f"{key} {row[key]!r} is not an integer ≥ {least}"
    for key in _TEXT:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"{key} {row[key]!r} is not text"
    for key in (*_QUANTITIES, *_SIGNED):
        v = row.get(key)
        if v is not None and not is_amount(v, signed=key in _SIGNED):
            return f"{key} {v!r} is not a finite number{'' if key in _SIGNED else ' ≥ 0'}"
    for key, v in row.items():
        if not key.startswith(("time_us", "warmup_us")) or v is None:
            continue
        if isinstance(v, list) and not key.endswith("_samples"):
            return f"{key} {v!r} is not a time (only *_samples hold a list)"
        values = v if isinstance(v, list) else [v]
        for x in values:
            if not is_amount(x):
                return f"{key} {x!r} is not a finite time ≥ 0 µs"
    if status == "ok" and "time_us" in row and row["time_us"] == 0:
        return "time_us 0 in an ok row: a measured case takes time"
    lo, hi = row.get("time_us_min"), row.get("time_us_max")
    if lo is not None and hi is not None:  # both finite numbers ≥ 0 by now
        for key in ("time_us_median", "time_us_mean"):
            v = row.get(key)
            if v is not None and not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                return f"{key} {v!r} is outside the row's own [time_us_min, time_us_max] = [{lo!r}, {hi!r}]"
    run_world = (manifest or {}).get("world_size")
    if row.get("world_size") is not None and run_world is not None and row["world_size"] != run_world:
        return f"world_size {row['world_size']!r}, but the run's manifest says {run_world!r}"
    return None
