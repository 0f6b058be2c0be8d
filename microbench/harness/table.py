"""The human table: a header, one line per case, a footer (the nccl-tests layout).

Only formatting lives here; which rows exist and what the run's outcome is belong to the
lifecycle (:mod:`microbench.harness.lifecycle`).
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microbench.harness.contract import Probe


def format_row(probe: Probe, row: dict[str, Any]) -> str:
    cells = []
    for header, key, spec in probe.columns:
        width = max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
        value = row.get(key)
        if key == "num_wrong" and row.get("num_wrong"):  # a failed check shows its count
            cells.append(format(value, spec))
        elif row.get("status") != "ok" and key.startswith(("time", "algbw", "busbw", "tflops", "gbps", "num_wrong", "pct")):
            cells.append(f"{row.get('status', '?'):>{width}}")
        elif value is None:
            cells.append(f"{'n/a':>{width}}")
        else:
            try:
                cells.append(format(value, spec))
            except (TypeError, ValueError):
                cells.append(f"{str(value):>{width}}")
    return " ".join(cells)


def header_line(probe: Probe) -> str:
    cells = []
    for header, _key, spec in probe.columns:
        width = max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
        cells.append(f"{header:>{width}}")
    return "#" + " ".join(cells)[1:]


def footer(probe: Probe, rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    wrong = sum(r.get("num_wrong", 0) or 0 for r in rows)  # failed checks included
    print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    if probe.footer_metric:
        vals = [r[probe.footer_metric] for r in ok if r.get(probe.footer_metric) is not None]
        label = {"busbw_gbps": "bus bandwidth", "tflops": "TFLOP/s", "gbps": "GB/s"}.get(
            probe.footer_metric, probe.footer_metric)
        if vals:
            print(f"# Avg {label:<17}: {statistics.fmean(vals):.4g}")
        else:
            print(f"# Avg {label:<17}: n/a (no case has one)")
    unstable = sum(bool(r.get("warning")) for r in ok)
    if unstable:
        print(f"# {unstable} case(s) unstable: use more iterations (-n), pin the CPU, "
              "or keep other work off the machine")
    skipped = sum(r.get("status") == "skipped" for r in rows)
    failed = sum(r.get("status") == "failed" for r in rows)
    if skipped or failed:
        print(f"# {skipped} case(s) skipped, {failed} failed (see rows)")
