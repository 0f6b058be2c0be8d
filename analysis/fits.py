"""α–β fits: t = α + β·S, least squares with α, β ≥ 0 (Hockney's model).

Used by the measured system profile (one fit per collective kind, group size and placement)
and by report plots. The residual is reported so a poor fit (a protocol switch inside the
sweep, a noisy link) is visible rather than silently averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class Fit:
    alpha_s: float
    """Latency: seconds at zero size."""
    beta_s_per_byte: float
    """Inverse bandwidth: seconds per byte of S (nccl-tests' buffer size)."""
    residual_rel: float
    """Root-mean-square of (fit − measured)/measured over the points."""
    n: int
    """Number of points fitted."""

    def time_s(self, size_bytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * size_bytes

    @property
    def bandwidth_gbps(self) -> float:
        """Asymptotic algorithm bandwidth S/t in GB/s (1e9 B/s)."""
        return 1e-9 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else float("inf")


def fit_alpha_beta(sizes_bytes: Sequence[float], times_s: Sequence[float], *,
                   relative: bool = True) -> Fit:
    """Non-negative least squares of t = α + β·S.

    ``relative`` weights each point by 1/t (minimises relative error), so the small sizes
    that fix α are not drowned by the large sizes that fix β. Two unknowns: solve the
    unconstrained problem, and if a coefficient comes out negative, refit with it pinned
    at zero (the exact NNLS solution for two variables).
    """
    x = np.asarray(sizes_bytes, dtype=float)
    t = np.asarray(times_s, dtype=float)
    if x.shape != t.shape or x.ndim != 1:
        raise ValueError(f"sizes ({x.shape}) and times ({t.shape}) must be 1-D of equal length")
    if len(x) == 0:
        raise ValueError("fit_alpha_beta needs at least one point, got none")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t))):
        raise ValueError("fit_alpha_beta: sizes and times must be finite")
    if np.any(t <= 0) or np.any(x < 0):
        raise ValueError("fit_alpha_beta: times must be > 0 and sizes ≥ 0")
    w = 1.0 / t if relative else np.ones_like(t)
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    b = t * w
    candidates: list[tuple[float, float]] = []
    if len(x) >= 2 and np.ptp(x) > 0:
        coef, *_ = np.linalg.lstsq(A, b, rcond=None)
        if coef[0] >= 0 and coef[1] >= 0:
            candidates.append((float(coef[0]), float(coef[1])))
    # α only, β only (each a one-variable weighted least squares, clipped at zero)
    a_only = float(np.dot(A[:, 0], b) / np.dot(A[:, 0], A[:, 0]))
    candidates.append((max(a_only, 0.0), 0.0))
    if np.dot(A[:, 1], A[:, 1]) > 0:
        b_only = float(np.dot(A[:, 1], b) / np.dot(A[:, 1], A[:, 1]))
        candidates.append((0.0, max(b_only, 0.0)))

    def sse(c: tuple[float, float]) -> float:
        return float(np.sum((A @ np.array(c) - b) ** 2))

    if len(x) < 2 or np.ptp(x) == 0:
        # One size cannot separate latency from bandwidth. Such a point is a model-sized
        # message (or a chunk of an optimizer step): let time scale with bytes rather than
        # price every size the same. min() keeps the first of equal fits.
        candidates.reverse()
    alpha, beta = min(candidates, key=sse)
    rel = (alpha + beta * x - t) / t
    return Fit(alpha_s=alpha, beta_s_per_byte=beta,
               residual_rel=float(np.sqrt(np.mean(rel ** 2))), n=int(len(x)))
