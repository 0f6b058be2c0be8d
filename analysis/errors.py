"""The analysis layer's one error type.

Everything a user can get wrong on the analysis side (a spec file, a run directory, a flag
that is missing) raises :class:`AnalysisError` with one line that names the file, key or
flag; the CLIs print it as ``error: …`` and exit 2 (a usage error, DESIGN.md).
"""
from __future__ import annotations


class AnalysisError(ValueError):
    """Input the analysis cannot use; one line naming the file, key or flag (CLI exit 2)."""
