"""DeepSpeed's comms-logger summary table (``comms_logger`` in the DeepSpeed JSON): a header
``Comm. Op  Message Size  Count  Total Latency(ms) …``, then an op name on its own line and
one row per message size. Sizes are DeepSpeed's ``convert_size`` (1024-based); a negative
latency is kept and flagged, never dropped (clock skew or a logger bug, not a real time).
"""
from __future__ import annotations

import re

from full_model.megatron.logtext import NUM, norm_key

COMMS_COLUMNS = [
    "op", "message_size", "message_bytes", "count", "total_latency_ms", "avg_latency_ms",
    "algbw_gbps", "busbw_gbps", "negative_latency", "iteration", "lineno",
]
COMMS_HEAD = re.compile(r"Comm\.\s*Op\s+Message Size", re.IGNORECASE)
_OP = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*$")
_ROW = re.compile(rf"^\s*(\d+(?:\.\d+)?)\s*([KMGTPEZY]?B)\s+((?:(?:{NUM})\s*)+)$", re.IGNORECASE)
_SIZE_UNITS = {u: 1024 ** i for i, u in enumerate(["B", "KB", "MB", "GB", "TB", "PB", "EB",
                                                    "ZB", "YB"])}  # DeepSpeed convert_size: 1024-based
_HEADER_MAP = {"count": "count", "total_latency_ms": "total_latency_ms",
               "avg_latency_ms": "avg_latency_ms", "tput_avg_gbps": "algbw_gbps",
               "busbw_avg_gbps": "busbw_gbps"}


class CommsTable:
    """One table being read: its numeric columns (from the header line) and the current op."""

    def __init__(self, header: str):
        names = [norm_key(n) for n in re.split(r"\s{2,}", header.strip())]
        numeric = [n for n in names if n not in ("comm_op", "message_size")]
        self.cols = [_HEADER_MAP.get(n, n) for n in numeric]
        """Numeric column names after 'Comm. Op' and 'Message Size', in printed order."""
        self.op: str | None = None

    def line(self, body: str, lineno: int, *, iteration: int | None, out: list[dict],
             warnings: list[tuple[int, str]]) -> bool:
        """Consume one line of the table (an op name, or a row into ``out``); False when the
        table has ended."""
        m = _OP.match(body)
        if m:
            self.op = m.group(1)
            return True
        m = _ROW.match(body)
        if not m:
            return False
        values = [float(v) for v in m.group(3).split()]
        row: dict = {c: None for c in COMMS_COLUMNS}
        row.update(op=self.op, message_size=f"{m.group(1)} {m.group(2).upper()}",
                   message_bytes=float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()],
                   iteration=iteration, lineno=lineno)
        for name, value in zip(self.cols, values):
            if name in row:
                row[name] = value
        lat = [row["total_latency_ms"], row["avg_latency_ms"]]
        row["negative_latency"] = any(v is not None and v < 0 for v in lat)
        if row["negative_latency"]:
            warnings.append((lineno, f"comms {self.op} {row['message_size']}: negative latency kept "
                                     f"(total {lat[0]} ms, avg {lat[1]} ms); clock skew or a "
                                     "logger bug, not a real time"))
        out.append(row)
        return True
