"""The text of a log line, before any record is read from it: numbers as Megatron and
DeepSpeed print them, field keys normalized, and the prefixes a logger or launcher puts in
front (with the timestamp they may carry). :mod:`full_model.megatron.logparse` reads records
with these; nothing here knows what a record is.
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
