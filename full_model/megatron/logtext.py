"""The text of a log line, before any record is read from it: numbers as Megatron and
DeepSpeed print them, field keys normalized, and the prefixes a logger or launcher puts in
front (with the timestamp they may carry). :mod:`full_model.megatron.logparse` reads records
with these; nothing here knows what a record is. And the other way: the one iteration line the
project's reference step writes (:func:`format_iteration_line`), so one parser reads both.
"""
from __future__ import annotations

import datetime as _dt
import re

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
"""A number as printed: decimal, exponent, ``nan``, ``inf`` (a regex fragment)."""
NUM_RE = re.compile(rf"^(?:{NUM})$", re.IGNORECASE)
TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:[.,](\d{1,6}))?")

# Prefixes a logger or launcher puts before the text: "[...]" groups (timestamps, levels,
# "[file:line]", "[Rank 0]", mpirun's "[1,0]<stdout>:"), "0: " from mpiexec -l, " - ".
_PREFIX = re.compile(r"^(?:\s+|\[[^\]]*\](?:<std(?:out|err)>)?:?|\d+:(?=\s)|-(?=\s)|"
                     rf"{TIMESTAMP.pattern}(?=[\s\]:]))")


def norm_key(key: str) -> str:
    """Lower case, non-alphanumerics → ``_``: the upstream "elapsed time per iteration (ms)"
    and the kv "elapsed_time_per_iteration_ms" normalize alike; ``[LM]``/``[DS]`` → ``lm_``/``ds_``."""
    key = key.strip().lower().replace("[lm]", "lm_").replace("[ds]", "ds_")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def number(text: str) -> float:
    """The number ``text`` is, or ValueError (no unit, no trailing text)."""
    text = text.strip()
    if not NUM_RE.match(text):
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
            ts = iso_timestamp(m.group(0))
        rest = rest[m.end():]


def iso_timestamp(text: str) -> str | None:
    """The ISO form of the first timestamp in ``text``; None for none, or an impossible date
    (month 13, 25:00) — the iteration check names such a line."""
    m = TIMESTAMP.search(text)
    if not m:
        return None
    iso = f"{m.group(1)}T{m.group(2)}"
    try:
        _dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return f"{iso}.{m.group(3)}" if m.group(3) else iso


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
