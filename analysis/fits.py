"""α–β fits: t = α + β·S, least squares with α, β ≥ 0 (Hockney's model).

Used by the measured system profile (one fit per collective kind, group size, concurrent
groups and placement) and by the report's plots: :func:`collective_points` is the one
selection of rows and statistic both use, so the report draws the fit the predictor prices. The residual is reported so a poor fit (a protocol switch inside the
sweep, a noisy link) is visible rather than silently averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


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


# ---------------------------------------------------------------------------------------------
# The one selection of rows and statistic behind every collective fit: the measured profile
# prices from these fits and the report draws them, so both show the same α and β.

FIT_KEYS = ("kind", "group_size", "num_groups", "crosses_nodes")
"""One fit per run and per these keys (axes of the same size and placement are one link)."""
COLLECTIVE_KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "reduce",
                    "sendrecv")


def time_s(df: "pd.DataFrame") -> "pd.Series":
    """Seconds per row: the per-iteration *mean* where a row has one. A step is a sum of many
    operations, and the expectation of a sum is the sum of the means; the median a probe
    reports leaves out the slow tail that every long sequence of collectives meets (on a
    shared CPU the mean of a small gloo allreduce is 1.5–3× its median). Rows without a mean
    (a ceiling measured as its best iteration) use their reported time."""
    import pandas as pd
    if "time_us" not in df.columns and "time_us_median" not in df.columns:
        raise ValueError("measured rows have no time_us or time_us_median column")
    reported = df["time_us"].astype(float) if "time_us" in df.columns else \
        pd.Series(float("nan"), index=df.index)
    if "time_us_median" in df.columns:
        reported = reported.fillna(df["time_us_median"].astype(float))
    if "time_us_mean" in df.columns:
        return df["time_us_mean"].astype(float).fillna(reported) * 1e-6
    return reported * 1e-6


def is_derived(df: "pd.DataFrame") -> "pd.Series":
    """Rows a probe derived from measured ones (the DP probe's whole-step row, extrapolated
    from a few buckets): they are results, never points of a fit."""
    import pandas as pd
    out = pd.Series(False, index=df.index)
    if "extrapolated" in df.columns:
        out |= df["extrapolated"].notna()
    if "time_us_measured" in df.columns:
        out |= df["time_us_measured"].notna()
    if "op" in df.columns:
        out |= df["op"].isin(["dp_sync_step"])
    return out


def collective_points(df: "pd.DataFrame", kind: str | None = None) -> "pd.DataFrame":
    """The rows every collective fit is made of: status ok, measured (not derived), a group
    of more than one rank, keys filled (axis 'world', one group, intra-node where a probe
    left them out); out-of-place rows when a sweep has both (one point per size); send/recv
    one-way transfers when there are any (the predictor charges each direction on its own).
    ``_t_s`` is :func:`time_s`; ``_run`` the caller's run label (else one run)."""
    import pandas as pd
    c = df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df
    if "kind" not in c.columns or "size_bytes" not in c.columns:
        return c.iloc[0:0]
    c = c[c["kind"].isin([kind] if kind else COLLECTIVE_KINDS) & ~is_derived(c)]
    if c.empty:
        return c

    def col(name: str, default: Any) -> "pd.Series":
        return c[name] if name in c.columns else pd.Series(default, index=c.index, dtype=object)

    c = c.assign(axis=col("axis", "world").fillna("world"),
                 group_size=col("group_size", 1).fillna(1).astype(int),
                 num_groups=col("num_groups", 1).fillna(1).astype(int),
                 crosses_nodes=col("crosses_nodes", False).fillna(False).astype(bool),
                 _t_s=time_s(c), _run=col("_run", "run").fillna("run"))
    c = c[(c["group_size"] > 1) & c["size_bytes"].notna() & (c["_t_s"] > 0)]
    keys = [c["_run"], *(c[k] for k in FIT_KEYS)]
    if "in_place" in c.columns and len(c):
        inplace = c["in_place"].fillna(False).astype(bool)
        c = c[~(inplace & (~inplace).groupby(keys).transform("any"))]
    if "mode" in c.columns and len(c):
        sr = c["kind"] == "sendrecv"
        oneway = (c["mode"] == "oneway")
        has_oneway = (oneway & sr).groupby([c["_run"], *(c[k] for k in FIT_KEYS)]).transform("any")
        c = c[~(sr & has_oneway & ~oneway)]
    return c


def collective_fits(df: "pd.DataFrame", kind: str | None = None) -> dict[tuple, Fit]:
    """(run, kind, group_size, num_groups, crosses_nodes) → the α–β fit of its points."""
    c = collective_points(df, kind)
    return {tuple(key): fit_alpha_beta(g["size_bytes"].astype(float), g["_t_s"])
            for key, g in c.groupby(["_run", *FIT_KEYS], sort=True)}
