"""Read Megatron-DeepSpeed training logs into pandas: iterations, timers, comms-logger rows.

Why a parser of its own: the measured step time of a real run is the number the predictor is
judged against, and Megatron-DeepSpeed has printed its per-iteration line in several shapes
over the years (upstream ``key: value``, ALCF's ``key=value`` with one or two TFLOPs fields,
DeepSpeed's pipeline ``steps: …`` line), behind whatever prefix a logger or a launcher adds.
Following the mlcommons-logging habit, the parser strips prefixes, tolerates noise, and
returns the records *plus* the lines that looked like records but could not be read — a
record is never dropped silently.

The two TFLOP/s formulas differ by ~1.5× on the same step, so a bare ``TFLOPs`` value is only
assigned to a formula when the line's format and date say which one printed it (see
:func:`_bare_tflops_formula`); otherwise it stays in the ``tflops`` column as ``unknown``.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

ITERATION_COLUMNS = [
    "iteration", "train_iters", "elapsed_ms", "global_batch_size", "lm_loss",
    "samples_per_second", "tokens_per_gpu_per_second", "tflops_lm", "tflops_ds", "tflops",
    "tflops_formula", "consumed_samples", "consumed_tokens", "learning_rate", "loss_scale",
    "seq_len", "grad_norm", "num_skipped_iterations", "num_nan_iterations", "format",
    "timestamp", "lineno",
]
TIMER_COLUMNS = ["name", "time_ms", "min_ms", "max_ms", "source", "iteration", "lineno"]
COMMS_COLUMNS = [
    "op", "message_size", "message_bytes", "count", "total_latency_ms", "avg_latency_ms",
    "algbw_gbps", "busbw_gbps", "negative_latency", "iteration", "lineno",
]

# Normalized field key (lower case, non-alphanumerics -> "_") -> column. Both the upstream
# "elapsed time per iteration (ms)" and the kv "elapsed_time_per_iteration_ms" normalize alike.
_FIELD_MAP: dict[str, str] = {
    "consumed_samples": "consumed_samples",
    "consumed_tokens": "consumed_tokens",
    "elapsed_time_per_iteration_ms": "elapsed_ms",
    "learning_rate": "learning_rate",
    "global_batch_size": "global_batch_size",
    "lm_loss": "lm_loss",
    "loss_scale": "loss_scale",
    "actual_seqlen": "seq_len",
    "grad_norm": "grad_norm",
    "number_of_skipped_iterations": "num_skipped_iterations",
    "number_of_nan_iterations": "num_nan_iterations",
    "samples_per_second": "samples_per_second",
    "tokens_per_gpu_per_second_tgs": "tokens_per_gpu_per_second",
    "tokens_per_gpu_per_second": "tokens_per_gpu_per_second",
    "lm_tflops": "tflops_lm",  # "[LM]-TFLOPs" and "[LM]TFLOPs"
    "ds_tflops": "tflops_ds",  # "[DS]-TFLOPs" and "[DS]TFLOPs"
    "tflops": "tflops",        # bare: formula decided by _bare_tflops_formula
}
_INT_COLUMNS = ("iteration", "train_iters", "global_batch_size", "consumed_samples",
                "consumed_tokens", "seq_len", "num_skipped_iterations", "num_nan_iterations",
                "lineno")

# Eras of the bare TFLOPs field (argonne-lcf/Megatron-DeepSpeed history, as given in issue 6):
# the kv form printed the DeepSpeed-style estimate from 2024-04-18 through 2024-06-21, and the
# LM formula since 2025-06-16. Between those dates the meaning is not established.
KV_DS_ERA = (_dt.date(2024, 4, 18), _dt.date(2024, 6, 21))
KV_LM_SINCE = _dt.date(2025, 6, 16)

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
_NUM_RE = re.compile(rf"^(?:{_NUM})$", re.IGNORECASE)
_ITER_HEAD = re.compile(r"\biteration\b\s*[=:]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_ITER_HINT = re.compile(r"iteration", re.IGNORECASE)
_ELAPSED_HINT = re.compile(r"elapsed", re.IGNORECASE)
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:[.,](\d{1,6}))?")
_DS_PIPE = re.compile(
    rf"\bsteps:\s*(\d+)\s+loss:\s*({_NUM})\s+iter time \(s\):\s*({_NUM})"
    rf"(?:\s+samples/sec:\s*({_NUM}))?", re.IGNORECASE)
_DS_TIMERS = re.compile(r"\btime \(ms\)\s*\|(.*)$")
_MINMAX_HEAD = re.compile(r"(\(min, max\)|max|min|minmax)\s+time across ranks \(ms\):\s*$")
_MINMAX_ROW = re.compile(
    rf"^\s*([A-Za-z_][\w\-/ ]*?)\s*\.*\s*:\s*(?:\(\s*({_NUM})\s*,\s*({_NUM})\s*\)|({_NUM}))\s*$",
    re.IGNORECASE)
_COMMS_HEAD = re.compile(r"Comm\.\s*Op\s+Message Size", re.IGNORECASE)
_COMMS_OP = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*$")
_COMMS_ROW = re.compile(rf"^\s*(\d+(?:\.\d+)?)\s*([KMGTPEZY]?B)\s+((?:(?:{_NUM})\s*)+)$",
                        re.IGNORECASE)
_SIZE_UNITS = {u: 1024 ** i for i, u in enumerate(["B", "KB", "MB", "GB", "TB", "PB", "EB",
                                                    "ZB", "YB"])}  # DeepSpeed convert_size: 1024-based
_COMMS_HEADER_MAP = {"count": "count", "total_latency_ms": "total_latency_ms",
                     "avg_latency_ms": "avg_latency_ms", "tput_avg_gbps": "algbw_gbps",
                     "busbw_avg_gbps": "busbw_gbps"}
# Prefixes a logger or launcher puts before the text: "[...]" groups (timestamps, levels,
# "[file:line]", "[Rank 0]", mpirun's "[1,0]<stdout>:"), "0: " from mpiexec -l, " - ".
_PREFIX = re.compile(r"^(?:\s+|\[[^\]]*\](?:<std(?:out|err)>)?:?|\d+:(?=\s)|-(?=\s)|"
                     rf"{_TIMESTAMP.pattern}(?=[\s\]:]))")


@dataclass
class ParseResult:
    """Everything read from one log; DataFrames always carry their full column set."""

    iterations: pd.DataFrame
    """One row per iteration line (any format), in file order."""
    timers: pd.DataFrame
    """Megatron (min, max) timer rows and DeepSpeed ``time (ms) |`` rows."""
    comms: pd.DataFrame
    """DeepSpeed comms-logger summary rows; ``negative_latency`` flags impossible timings."""
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    """(lineno, line) of lines that looked like an iteration record but could not be read."""
    warnings: list[tuple[int, str]] = field(default_factory=list)
    """(lineno, message) for records read with a problem (bad optional value, negative time)."""

    def to_json_obj(self) -> dict:
        """A JSON-ready dict (NaN -> None) so ``--json`` output is valid strict JSON."""
        def rows(df: pd.DataFrame) -> list[dict]:
            out = df.astype(object).where(df.notna(), None).to_dict(orient="records")
            return [{k: _plain(v) for k, v in r.items()} for r in out]
        return {"iterations": rows(self.iterations), "timers": rows(self.timers),
                "comms": rows(self.comms),
                "unreadable": [{"lineno": n, "line": s} for n, s in self.unreadable],
                "warnings": [{"lineno": n, "message": s} for n, s in self.warnings]}


def _plain(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return v.item()  # numpy scalar -> Python
    return v


def _norm_key(key: str) -> str:
    key = key.strip().lower().replace("[lm]", "lm_").replace("[ds]", "ds_")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def _number(text: str) -> float:
    text = text.strip()
    if not _NUM_RE.match(text):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def strip_prefix(line: str) -> tuple[str | None, str]:
    """Remove logger/launcher prefixes; return (ISO timestamp or None, the rest)."""
    ts: str | None = None
    rest = line.rstrip("\r\n")
    while True:
        m = _PREFIX.match(rest)
        if not m or not m.group(0):
            return ts, rest
        if ts is None:
            ts = _iso_timestamp(m.group(0))
        rest = rest[m.end():]


def _iso_timestamp(text: str) -> str | None:
    """The ISO form of the first timestamp in ``text``; None for none, or an impossible date
    (month 13, 25:00) — :func:`_check_iteration` names such a line."""
    m = _TIMESTAMP.search(text)
    if not m:
        return None
    iso = f"{m.group(1)}T{m.group(2)}"
    try:
        _dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return f"{iso}.{m.group(3)}" if m.group(3) else iso


_MAX_INT = 2 ** 53  # larger counts are not exact in a float column and are not real counts


def _check_iteration(row: dict, raw: str, lineno: int, warnings: list[tuple[int, str]]) -> bool:
    """Refuse what cannot be a measurement, naming the line: an elapsed time that is NaN,
    infinite, zero or negative, or an iteration number too large to be one (False: the
    line goes to ``unreadable``). Clear what is impossible but optional — a NaN or infinite
    loss, a count too large, a date that does not exist — with a warning."""
    elapsed = row.get("elapsed_ms")
    if elapsed is None or not math.isfinite(elapsed) or elapsed <= 0:
        warnings.append((lineno, f"elapsed time {elapsed} ms is not a time (NaN, infinite, zero "
                                 "or negative): record refused"))
        return False
    for col in ("iteration", "train_iters"):
        v = row.get(col)
        if v is not None and not 0 <= v < _MAX_INT:
            warnings.append((lineno, f"{col} {v}: not a plausible count: record refused"))
            return False
    for col in _INT_COLUMNS:
        v = row.get(col)
        if col not in ("iteration", "train_iters", "lineno") and v is not None and \
                not (math.isfinite(v) and abs(v) < _MAX_INT):
            warnings.append((lineno, f"{col} {v}: not a plausible count: left empty"))
            row[col] = None
    for col, v in list(row.items()):
        if isinstance(v, float) and not math.isfinite(v):
            what = "a NaN loss (a diverged step)" if col == "lm_loss" else "not a finite number"
            warnings.append((lineno, f"{col} {v}: {what}: left empty"))
            row[col] = None
    m = _TIMESTAMP.search(raw)
    if m and row.get("timestamp") is None:
        warnings.append((lineno, f"timestamp {m.group(0)!r} is not a real date/time: ignored"))
    return True


def _bare_tflops_formula(fmt: str, timestamp: str | None) -> str:
    """Which formula a bare ``TFLOPs`` value used: 'ds', 'lm' or 'unknown' (see module doc)."""
    if fmt == "upstream":
        return "ds"
    if timestamp is None:
        return "unknown"
    day = _dt.date.fromisoformat(timestamp[:10])
    if KV_DS_ERA[0] <= day <= KV_DS_ERA[1]:
        return "ds"
    if day >= KV_LM_SINCE:
        return "lm"
    return "unknown"


def _empty_row(lineno: int, fmt: str, timestamp: str | None) -> dict:
    row: dict = {c: None for c in ITERATION_COLUMNS}
    row.update(lineno=lineno, format=fmt, timestamp=timestamp)
    return row


def _parse_megatron_iteration(line: str, lineno: int,
                              warnings: list[tuple[int, str]]) -> dict | None:
    """Read an upstream or kv iteration line; None if it is not one we can read."""
    head = _ITER_HEAD.search(line)
    if head is None:
        return None
    timestamp = _iso_timestamp(line[:head.start()])
    fmt = "kv" if "=" in line[head.start():head.end()] else "upstream"
    row = _empty_row(lineno, fmt, timestamp)
    row["iteration"], row["train_iters"] = int(head.group(1)), int(head.group(2))
    for part in line[head.end():].split("|"):
        part = part.strip()
        if not part:
            continue
        sep = "=" if fmt == "kv" and "=" in part else ":"
        if sep not in part:
            continue  # free text between fields: noise, not a field
        key, _, value = part.rpartition(sep)
        column = _FIELD_MAP.get(_norm_key(key))
        if column is None:
            continue  # a field we do not model (kept out of the frame on purpose)
        try:
            row[column] = _number(value)
        except ValueError:
            if column == "elapsed_ms":
                return None
            warnings.append((lineno, f"{key.strip()}: unreadable value {value.strip()!r}"))
    if row["elapsed_ms"] is None:
        return None
    if row["tflops"] is not None:
        formula = _bare_tflops_formula(fmt, timestamp)
        row["tflops_formula"] = formula
        target = {"ds": "tflops_ds", "lm": "tflops_lm"}.get(formula)
        if target and row[target] is None:
            row[target] = row["tflops"]
    return row


def _parse_ds_pipe(line: str, lineno: int) -> dict | None:
    m = _DS_PIPE.search(line)
    if m is None:
        return None
    row = _empty_row(lineno, "deepspeed_pipe", _iso_timestamp(line[:m.start()]))
    row["iteration"] = int(m.group(1))
    row["lm_loss"] = float(m.group(2))
    row["elapsed_ms"] = float(m.group(3)) * 1e3  # DeepSpeed prints seconds
    row["samples_per_second"] = float(m.group(4)) if m.group(4) else None
    return row


def _read_lines(path_or_lines: str | os.PathLike | Iterable[str]) -> list[str]:
    if isinstance(path_or_lines, (str, os.PathLike)):
        with open(path_or_lines, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    return [s.rstrip("\r\n") for s in path_or_lines]


def parse_log(path_or_lines: str | os.PathLike | Iterable[str]) -> ParseResult:
    """Parse a Megatron-DeepSpeed log (a path, or an iterable of lines — a ``str`` is a path).

    Raises ``FileNotFoundError``/``IsADirectoryError`` for a bad path; a log without
    iteration lines gives an empty ``iterations`` frame (the CLI turns that into an error).
    """
    lines = _read_lines(path_or_lines)
    iters: list[dict] = []
    timers: list[dict] = []
    comms: list[dict] = []
    unreadable: list[tuple[int, str]] = []
    warnings: list[tuple[int, str]] = []
    last_iter: int | None = None
    minmax_block = False
    comms_cols: list[str] | None = None
    comms_op: str | None = None

    for lineno, raw in enumerate(lines, start=1):
        _, body = strip_prefix(raw)
        if minmax_block:
            m = _MINMAX_ROW.match(body)
            if m:
                lo, hi, single = m.group(2), m.group(3), m.group(4)
                timers.append({"name": m.group(1).strip(),
                               "time_ms": float(hi) if hi else float(single),
                               "min_ms": float(lo) if lo else None,
                               "max_ms": float(hi) if hi else float(single),
                               "source": "megatron", "iteration": last_iter, "lineno": lineno})
                continue
            minmax_block = False
        if comms_cols is not None:
            if _comms_line(body, lineno, comms_cols, comms_op, last_iter, comms, warnings):
                m = _COMMS_OP.match(body)
                if m:
                    comms_op = m.group(1)
                continue
            comms_cols, comms_op = None, None
        if _MINMAX_HEAD.search(body):
            minmax_block = True
            continue
        if _COMMS_HEAD.search(body):
            comms_cols = _comms_header(body)
            continue
        m = _DS_TIMERS.search(body)
        if m:
            for part in m.group(1).split("|"):
                name, sep, value = part.partition(":")
                if sep and _NUM_RE.match(value.strip()):
                    timers.append({"name": name.strip(), "time_ms": float(value),
                                   "min_ms": None, "max_ms": None, "source": "deepspeed",
                                   "iteration": last_iter, "lineno": lineno})
            continue
        row = _parse_ds_pipe(raw, lineno)
        if row is None and _ITER_HINT.search(raw) and _ELAPSED_HINT.search(raw):
            row = _parse_megatron_iteration(raw, lineno, warnings)
            if row is None:
                unreadable.append((lineno, raw))
                continue
        if row is not None and not _check_iteration(row, raw, lineno, warnings):
            unreadable.append((lineno, raw))
            continue
        if row is not None:
            iters.append(row)
            last_iter = row["iteration"]

    # DeepSpeed's pipeline engine prints its own "steps: N" line beside Megatron's iteration
    # line for the same step (steps_per_print): keep Megatron's, never count a step twice.
    megatron_iters = {r["iteration"] for r in iters if r.get("format") != "deepspeed_pipe"}
    iters = [r for r in iters if r.get("format") != "deepspeed_pipe" or r["iteration"] not in megatron_iters]
    return ParseResult(iterations=_frame(iters, ITERATION_COLUMNS),
                       timers=_frame(timers, TIMER_COLUMNS),
                       comms=_frame(comms, COMMS_COLUMNS),
                       unreadable=unreadable, warnings=warnings)


def _comms_header(body: str) -> list[str]:
    """Numeric column names after 'Comm. Op' and 'Message Size', in printed order."""
    names = [_norm_key(n) for n in re.split(r"\s{2,}", body.strip())]
    numeric = [n for n in names if n not in ("comm_op", "message_size")]
    return [_COMMS_HEADER_MAP.get(n, n) for n in numeric]


def _comms_line(body: str, lineno: int, cols: list[str], op: str | None,
                last_iter: int | None, out: list[dict],
                warnings: list[tuple[int, str]]) -> bool:
    """Consume one line of a comms table; False when the table has ended."""
    if _COMMS_OP.match(body):
        return True
    m = _COMMS_ROW.match(body)
    if not m:
        return False
    values = [float(v) for v in m.group(3).split()]
    row: dict = {c: None for c in COMMS_COLUMNS}
    row.update(op=op, message_size=f"{m.group(1)} {m.group(2).upper()}",
               message_bytes=float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()],
               iteration=last_iter, lineno=lineno)
    for name, value in zip(cols, values):
        if name in row:
            row[name] = value
    lat = [row["total_latency_ms"], row["avg_latency_ms"]]
    row["negative_latency"] = any(v is not None and v < 0 for v in lat)
    if row["negative_latency"]:
        warnings.append((lineno, f"comms {op} {row['message_size']}: negative latency kept "
                                 f"(total {lat[0]} ms, avg {lat[1]} ms); clock skew or a "
                                 "logger bug, not a real time"))
    out.append(row)
    return True


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for c in _INT_COLUMNS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    for c in df.columns:
        if c not in _INT_COLUMNS and c not in ("name", "source", "op", "message_size", "format",
                                               "timestamp", "tflops_formula",
                                               "negative_latency"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        elif c in ("name", "source", "op", "message_size", "format", "timestamp",
                   "tflops_formula"):
            df[c] = df[c].astype(object).where(df[c].notna(), None)  # None, never NaN
    return df


def format_iteration_line(iteration: int, *, train_iters: int, elapsed_ms: float,
                          global_batch_size: int, lm_loss: float, samples_per_second: float,
                          tokens_per_gpu_per_second: float, tflops_lm: float,
                          consumed_samples: int, seq_len: int, learning_rate: float = 0.0,
                          loss_scale: float = 1.0, tflops_ds: float | None = None,
                          num_skipped_iterations: int = 0, num_nan_iterations: int = 0,
                          timestamp: _dt.datetime | str | bool | None = None) -> str:
    """One iteration line in the current Megatron-DeepSpeed ``key=value`` form.

    Why: the project's reference step logs what the real run logs, so one parser (and one
    cross-check) reads both. TFLOPs are written with the explicit ``[LM]-`` key so the
    formula is never guessed. ``timestamp`` True stamps now; a datetime/str stamps that,
    with the logger prefix ALCF's runs print (``[date time][INFO][module] - ``).
    """
    fields = [
        f"iteration={iteration:8d}/{train_iters:8d}",
        f"consumed_samples={consumed_samples:12d}",
        f"consumed_tokens={consumed_samples * seq_len:12d}",
        f"elapsed_time_per_iteration_ms={elapsed_ms:.1f}",
        f"learning_rate={learning_rate:.6g}",
        f"global_batch_size={global_batch_size:5d}",
        f"lm loss={lm_loss:.6f}",
        f"loss_scale={loss_scale:.1f}",
        f"actual_seqlen={seq_len:5d}",
        f"number_of_skipped_iterations={num_skipped_iterations:3d}",
        f"number_of_nan_iterations={num_nan_iterations:3d}",
        f"samples_per_second={samples_per_second:.3f}",
        f"tokens_per_gpu_per_second_tgs={tokens_per_gpu_per_second:.3f}",
        f"[LM]-TFLOPs={tflops_lm:.2f}",
    ]
    if tflops_ds is not None:
        fields.append(f"[DS]-TFLOPs={tflops_ds:.2f}")
    line = " " + " | ".join(fields) + " |"
    if timestamp is None or timestamp is False:
        return line
    if timestamp is True:
        timestamp = _dt.datetime.now()
    if isinstance(timestamp, _dt.datetime):
        timestamp = timestamp.strftime("%Y-%m-%d %H:%M:%S")
    return f"[{timestamp}][INFO][full_model.train] -{line}"
