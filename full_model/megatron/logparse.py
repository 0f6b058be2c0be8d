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

Prefixes, timestamps and numbers are read by :mod:`full_model.megatron.logtext`, DeepSpeed's
comms-logger table by :mod:`full_model.megatron.commslog`; the records are assembled here.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from full_model.megatron.commslog import COMMS_COLUMNS, COMMS_HEAD, CommsTable
from full_model.megatron.logtext import NUM, NUM_RE, TIMESTAMP, iso_timestamp, norm_key, number, strip_prefix
from full_model.megatron.logtext import format_iteration_line  # noqa: F401 (its old home; importers use it)
from microbench.harness.options import MAX_TIMEOUT_S

ITERATION_COLUMNS = [
    "iteration", "train_iters", "elapsed_ms", "global_batch_size", "lm_loss",
    "samples_per_second", "tokens_per_gpu_per_second", "tflops_lm", "tflops_ds", "tflops",
    "tflops_formula", "consumed_samples", "consumed_tokens", "learning_rate", "loss_scale",
    "seq_len", "grad_norm", "num_skipped_iterations", "num_nan_iterations", "format",
    "timestamp", "lineno",
]
TIMER_COLUMNS = ["name", "time_ms", "min_ms", "max_ms", "source", "iteration", "lineno"]

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

_ITER_HEAD = re.compile(r"\biteration\b\s*[=:]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_ITER_HINT = re.compile(r"iteration", re.IGNORECASE)
_ELAPSED_HINT = re.compile(r"elapsed", re.IGNORECASE)
_DS_PIPE = re.compile(
    rf"\bsteps:\s*(\d+)\s+loss:\s*({NUM})\s+iter time \(s\):\s*({NUM})"
    rf"(?:\s+samples/sec:\s*({NUM}))?", re.IGNORECASE)
_DS_TIMERS = re.compile(r"\btime \(ms\)\s*\|(.*)$")
_MINMAX_HEAD = re.compile(r"(\(min, max\)|max|min|minmax)\s+time across ranks \(ms\):\s*$")
_MINMAX_ROW = re.compile(
    rf"^\s*([A-Za-z_][\w\-/ ]*?)\s*\.*\s*:\s*(?:\(\s*({NUM})\s*,\s*({NUM})\s*\)|({NUM}))\s*$",
    re.IGNORECASE)


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


_MAX_INT = 2 ** 53  # larger counts are not exact in a float column and are not real counts


def _digits(text: str) -> int | float:
    """A count as printed; a digit string longer than any real count (Python refuses to convert
    over 4,300 digits) becomes ``inf``, which the plausibility check refuses by line."""
    return int(text) if len(text) <= 18 else math.inf


_MAX_ELAPSED_MS = MAX_TIMEOUT_S * 1e3
"""One iteration longer than the suite's longest --timeout-s (a week) is not a measurement."""
_NON_NEGATIVE = ("lm_loss", "learning_rate", "loss_scale", "grad_norm", "samples_per_second",
                 "tokens_per_gpu_per_second", "tflops_lm", "tflops_ds", "tflops")
"""Measured or logged quantities that a negative value cannot be (a cross-entropy loss, a rate)."""


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
    if elapsed > _MAX_ELAPSED_MS:
        warnings.append((lineno, f"elapsed time {elapsed:g} ms: longer than a week for one iteration, "
                                 "not a plausible time: record refused"))
        return False
    it, total = row.get("iteration"), row.get("train_iters")
    if it is not None and math.isfinite(it) and (it < 1 or total is not None and math.isfinite(total) and it > total):
        warnings.append((lineno, f"iteration {it} of {total}: outside 1..{total} (Megatron counts "
                                 "iterations from 1 to --train-iters): record refused"))
        return False
    for col in ("iteration", "train_iters"):
        v = row.get(col)
        if v is not None and not 0 <= v < _MAX_INT:
            shown = v if v != math.inf else "with more than 18 digits"
            warnings.append((lineno, f"{col} {shown}: not a plausible count: record refused"))
            return False
    for col in _INT_COLUMNS:
        v = row.get(col)
        if col not in ("iteration", "train_iters", "lineno") and v is not None and \
                not (math.isfinite(v) and abs(v) < _MAX_INT):
            warnings.append((lineno, f"{col} {v}: not a plausible count: left empty"))
            row[col] = None
    for col in _NON_NEGATIVE:
        v = row.get(col)
        if v is not None and math.isfinite(v) and v < 0:
            warnings.append((lineno, f"{col} {v}: negative, which it cannot be: left empty"))
            row[col] = None
    for col, v in list(row.items()):
        if isinstance(v, float) and not math.isfinite(v):
            what = "a NaN loss (a diverged step)" if col == "lm_loss" else "not a finite number"
            warnings.append((lineno, f"{col} {v}: {what}: left empty"))
            row[col] = None
    m = TIMESTAMP.search(raw)
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
    timestamp = iso_timestamp(line[:head.start()])
    fmt = "kv" if "=" in line[head.start():head.end()] else "upstream"
    row = _empty_row(lineno, fmt, timestamp)
    row["iteration"], row["train_iters"] = _digits(head.group(1)), _digits(head.group(2))
    seen: set[str] = set()  # a field given twice with two values: which one the run meant is unknown
    for part in line[head.end():].split("|"):
        part = part.strip()
        if not part:
            continue
        sep = "=" if fmt == "kv" and "=" in part else ":"
        if sep not in part:
            continue  # free text between fields: noise, not a field
        key, _, value = part.rpartition(sep)
        column = _FIELD_MAP.get(norm_key(key))
        if column is None:
            continue  # a field we do not model (kept out of the frame on purpose)
        try:
            v = number(value)
        except ValueError:
            if column == "elapsed_ms":
                return None
            warnings.append((lineno, f"{key.strip()}: unreadable value {value.strip()!r}"))
            continue
        if column in seen and row[column] != v and not (v != v and row[column] != row[column]):
            warnings.append((lineno, f"{column} given twice on one line ({row[column]} and {v}): record refused"))
            return None
        seen.add(column)
        row[column] = v
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
    row = _empty_row(lineno, "deepspeed_pipe", iso_timestamp(line[:m.start()]))
    row["iteration"] = _digits(m.group(1))
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
    reader = _Reader()
    for lineno, raw in enumerate(_read_lines(path_or_lines), start=1):
        reader.line(lineno, raw)
    return reader.result()


class _Reader:
    """One pass over a log, a line at a time. A line continues the block it is in (Megatron's
    "(min, max) time across ranks" rows, a comms-logger table), opens a block, is a DeepSpeed
    ``time (ms) |`` timer line, or may be an iteration record; anything else is noise."""

    def __init__(self) -> None:
        self.iters: list[dict] = []
        self.timers: list[dict] = []
        self.comms: list[dict] = []
        self.unreadable: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self.last_iter: int | None = None
        self.seen: dict[tuple, int] = {}  # (format, iteration) -> the line it was first read at
        self.first_total: tuple[int, int] | None = None  # (line, train_iters) of the first record
        self.minmax_block = False
        self.comms_table: CommsTable | None = None

    def line(self, lineno: int, raw: str) -> None:
        _, body = strip_prefix(raw)
        if self._in_minmax_block(body, lineno) or self._in_comms_table(body, lineno) \
                or self._opens_block(body) or self._ds_timers(body, lineno):
            return
        self._iteration(raw, lineno)

    def _in_minmax_block(self, body: str, lineno: int) -> bool:
        if not self.minmax_block:
            return False
        m = _MINMAX_ROW.match(body)
        if not m:
            self.minmax_block = False
            return False
        lo, hi, single = m.group(2), m.group(3), m.group(4)
        self.timers.append({"name": m.group(1).strip(), "time_ms": float(hi) if hi else float(single),
                            "min_ms": float(lo) if lo else None, "max_ms": float(hi) if hi else float(single),
                            "source": "megatron", "iteration": self.last_iter, "lineno": lineno})
        return True

    def _in_comms_table(self, body: str, lineno: int) -> bool:
        if self.comms_table is None:
            return False
        if not self.comms_table.line(body, lineno, iteration=self.last_iter, out=self.comms,
                                     warnings=self.warnings):
            self.comms_table = None
            return False
        return True

    def _opens_block(self, body: str) -> bool:
        if _MINMAX_HEAD.search(body):
            self.minmax_block = True
            return True
        if COMMS_HEAD.search(body):
            self.comms_table = CommsTable(body)
            return True
        return False

    def _ds_timers(self, body: str, lineno: int) -> bool:
        m = _DS_TIMERS.search(body)
        if not m:
            return False
        for part in m.group(1).split("|"):
            name, sep, value = part.partition(":")
            if sep and NUM_RE.match(value.strip()):
                self.timers.append({"name": name.strip(), "time_ms": float(value), "min_ms": None,
                                    "max_ms": None, "source": "deepspeed", "iteration": self.last_iter,
                                    "lineno": lineno})
        return True

    def _iteration(self, raw: str, lineno: int) -> None:
        """A DeepSpeed pipeline ``steps:`` line, or a Megatron iteration line; a line that
        looks like one but cannot be read (or fails the plausibility check) is kept, unread."""
        row = _parse_ds_pipe(raw, lineno)
        heads = len(_ITER_HEAD.findall(raw)) if row is None else 0
        if heads > 1:  # two ranks' (or two runs') output interleaved on one line
            self.warnings.append((lineno, f"{heads} iteration records on one line (interleaved output): "
                                          "record refused"))
            self.unreadable.append((lineno, raw))
            return
        if row is None and _ITER_HINT.search(raw) and _ELAPSED_HINT.search(raw):
            row = _parse_megatron_iteration(raw, lineno, self.warnings)
            if row is None:
                self.unreadable.append((lineno, raw))
                return
        elif row is None and heads and "|" in raw[_ITER_HEAD.search(raw).end():]:
            self.unreadable.append((lineno, raw))  # an iteration record cut short before its time
            return
        if row is None:
            return
        if not _check_iteration(row, raw, lineno, self.warnings):
            self.unreadable.append((lineno, raw))
            return
        if row.get("train_iters") is not None:
            if self.first_total is None:
                self.first_total = (lineno, row["train_iters"])
            elif row["train_iters"] != self.first_total[1]:
                self.warnings.append((lineno, f"train_iters {row['train_iters']}, but line {self.first_total[0]} "
                                              f"says {self.first_total[1]}: another run's record in the "
                                              "same log: record refused"))
                self.unreadable.append((lineno, raw))
                return
        key = (row.get("format"), row["iteration"])
        if key in self.seen:
            self.warnings.append((lineno, f"iteration {row['iteration']} again (first at line {self.seen[key]}): "
                                          "a restarted or concatenated log; both kept"))
        elif self.iters and row.get("format") != "deepspeed_pipe" and self.last_iter is not None \
                and row["iteration"] < self.last_iter:
            self.warnings.append((lineno, f"iteration {row['iteration']} after {self.last_iter}: the log "
                                          "goes back (a restart from a checkpoint?); kept"))
        self.seen.setdefault(key, lineno)
        self.iters.append(row)
        self.last_iter = row["iteration"]

    def result(self) -> ParseResult:
        # DeepSpeed's pipeline engine prints its own "steps: N" line beside Megatron's iteration
        # line for the same step (steps_per_print): keep Megatron's, never count a step twice.
        megatron_iters = {r["iteration"] for r in self.iters if r.get("format") != "deepspeed_pipe"}
        iters = [r for r in self.iters
                 if r.get("format") != "deepspeed_pipe" or r["iteration"] not in megatron_iters]
        return ParseResult(iterations=_frame(iters, ITERATION_COLUMNS), timers=_frame(self.timers, TIMER_COLUMNS),
                           comms=_frame(self.comms, COMMS_COLUMNS), unreadable=self.unreadable,
                           warnings=self.warnings)


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
