"""The analysis layer's one error type.

Everything a user can get wrong on the analysis side (a spec file, a run directory, a flag
that is missing) raises :class:`AnalysisError` with one line that names the file, key or
flag; the CLIs print it as ``error: …`` and exit 2 (a usage error, DESIGN.md).
"""
from __future__ import annotations


class AnalysisError(ValueError):
    """Input the analysis cannot use; one line naming the file, key or flag (CLI exit 2)."""


def require_finite(seconds: dict[str, float], sources: dict[str, str], *, where: str) -> None:
    """Refuse a prediction with a component that is not a finite number of seconds (NaN is
    wrong; a latency of 1e308 µs or an efficiency of 1e-300 in a spec gave inf or NaN, printed
    with exit 0), naming the component and what priced it."""
    import math
    bad = next((k for k, v in seconds.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise AnalysisError(f"{where}: the predicted {bad} time is {seconds[bad]} s, not a finite number: what "
                            f"prices it ({sources.get(bad) or 'see its sources'}) is outside any physical range")
