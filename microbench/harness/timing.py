"""Timing: the per-iteration device-correct timer, the statistics of a case, and the
stability warning (pyperf's habit: the number and the advice, never a silent drop).

Split from the harness so the rules of timing (DESIGN.md, Timing rules) can be read and
tested without a world.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from microbench.runtime.world import World

STABILITY_CV = 0.10  # warn when stdev > 10% of the mean


class Timer:
    """Per-iteration device-correct timer: device events where the torch version has them,
    else synchronize and read the host clock (never a bare host clock on async work)."""

    def __init__(self, world: World):
        import torch
        self.kind = world.device_kind
        self.torch = torch
        self.module = getattr(torch, self.kind, None) if self.kind != "cpu" else None
        event_cls = getattr(torch, "Event", None)
        if self.module is not None and event_cls is None:
            event_cls = getattr(self.module, "Event", None)
        self.event_cls = event_cls if self.module is not None else None
        self.method = "device_events" if self.event_cls is not None else \
            ("synchronize+perf_counter" if self.module is not None else "perf_counter")

    def sync(self) -> None:
        if self.module is not None:
            self.module.synchronize()

    def time(self, fn: Callable[[], None]) -> float:
        """Seconds of one call of ``fn``."""
        if self.event_cls is not None:
            start, end = self.event_cls(enable_timing=True), self.event_cls(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def summarize(samples_us: Sequence[float]) -> dict[str, float]:
    xs = sorted(samples_us)
    n = len(xs)
    p95 = xs[min(n - 1, max(0, math.ceil(0.95 * n) - 1))]
    return {"time_us_median": statistics.median(xs), "time_us_mean": statistics.fmean(xs),
            "time_us_min": xs[0], "time_us_max": xs[-1], "time_us_p95": p95,
            "time_us_stdev": statistics.stdev(xs) if n > 1 else 0.0}


def stability_warning(stats: dict[str, float], n: int) -> str | None:
    mean = stats["time_us_mean"]
    if n > 1 and mean > 0 and stats["time_us_stdev"] > STABILITY_CV * mean:
        cv = 100 * stats["time_us_stdev"] / mean
        return (f"stdev is {cv:.0f}% of the mean over {n} iterations; use more iterations "
                "(-n), pin the CPU, or keep other work off the machine")
    return None
