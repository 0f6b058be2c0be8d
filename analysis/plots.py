"""Plots of probe results and predictions; every function returns a matplotlib Figure.

Used by :mod:`analysis.report` and reusable from notebooks. Figures are built with
``matplotlib.figure.Figure`` (no pyplot state), so they work under any backend and a
report can draw hundreds without leaking memory; ``fig.savefig(path)`` writes a PNG.

Every plot has labelled axes with units, a legend and a title; message sizes are on a
log-2 axis, as nccl-tests sweeps them. Rows come from :func:`analysis.load`; several runs
in one frame are overlaid, each labelled by :func:`run_label` (host/device/run_id).
"""
from __future__ import annotations

import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from microbench.model.metrics import bus_factor

from analysis.fits import FIT_KEYS, Fit, collective_points
from analysis.fits import collective_fits as fit_collectives
from microbench.model.vocabulary import PROVENANCE_WORDS

GROUP_KEYS = FIT_KEYS
FIGSIZE = (8.0, 5.0)  # inches; 100 dpi PNG, readable on a laptop screen


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df


def _col(df: pd.DataFrame, name: str, default: Any = None) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index, dtype=object)


def time_s(df: pd.DataFrame) -> pd.Series:
    """The row's reported statistic in seconds (``time_us``, else ``time_us_median``)."""
    t = _col(df, "time_us").astype(float)
    if "time_us_median" in df.columns:
        t = t.fillna(df["time_us_median"].astype(float))
    return t * 1e-6


def run_label(df: pd.DataFrame) -> pd.Series:
    """host/device/run_id per row: how runs are told apart in legends."""
    host = _col(df, "run_hostname", "?").fillna("?").astype(str)
    dev = _col(df, "run_device", "?").fillna(_col(df, "device", "?")).fillna("?").astype(str)
    rid = _col(df, "run_id", "?").fillna("?").astype(str)
    return host + "/" + dev + "/" + rid


def _runs(df: pd.DataFrame) -> pd.Series:
    """The ``_run`` column a caller set (e.g. the report, one label per run directory), else
    :func:`run_label`."""
    return df["_run"] if "_run" in df.columns else run_label(df)


def format_bytes(v: float) -> str:
    """1024 → '1 KiB' (binary prefixes, as the probes' -b/-e sizes are given)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.4g} {unit}"
        v /= 1024
    return f"{v:.4g}"


def _group_label(key: Mapping[str, Any]) -> str:
    x = " inter-node" if bool(key.get("crosses_nodes")) else ""
    return f"{key['axis']} n={int(key['group_size'])} ×{int(key['num_groups'])} groups{x}"


# ---------------------------------------------------------------------------------------------
# Collectives

def collective_rows(df: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """The points of every collective fit (:func:`analysis.fits.collective_points`: the rows
    and statistic the measured profile prices from), labelled by run."""
    return collective_points(df.assign(_run=_runs(df)) if len(df) else df, kind)


def collective_fits(df: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """One row per run and fit key: the α–β fit the predictor uses (analysis.fits) and the
    best bus bandwidth among its points."""
    c = collective_rows(df, kind)
    fits = fit_collectives(df.assign(_run=_runs(df)) if len(df) else df, kind)
    out = []
    for key, g in (c.groupby(["_run", *GROUP_KEYS], sort=True) if len(c) else ()):
        k = dict(zip(["run", *GROUP_KEYS], key))
        fit = fits[tuple(key)]
        f = bus_factor(k["kind"], int(k["group_size"]))
        bus = f * g["size_bytes"].astype(float) / g["_t_s"] / 1e9
        out.append({**k, "axis": ",".join(sorted(set(g["axis"].astype(str)))), "num_points": len(g),
                    "min_bytes": int(g["size_bytes"].min()),
                    "max_bytes": int(g["size_bytes"].max()), "alpha_us": fit.alpha_s * 1e6,
                    "fit_busbw_gbps": f * fit.bandwidth_gbps if fit.beta_s_per_byte > 0 else float("nan"),
                    "max_busbw_gbps": float(bus.max()), "fit_residual_pct": 100 * fit.residual_rel,
                    "_fit": fit})
    return pd.DataFrame(out)


def busbw_vs_size(df: pd.DataFrame, kind: str, *, fit: bool = True) -> Figure:
    """Bus bandwidth (GB/s, nccl-tests convention) against message size S for one collective
    kind: one series per run and fit key (group size, concurrent groups, placement), markers
    for the points of the fit at its statistic (the per-iteration mean) and a dashed line for
    the α–β fit t = α + β·S the predictor prices from, drawn as busbw = factor·S/t."""
    c = collective_rows(df, kind)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    fits = collective_fits(df, kind).set_index(["run", *GROUP_KEYS]) if fit and not c.empty else None
    many_runs = c["_run"].nunique() > 1 if not c.empty else False
    for key, g in c.groupby(["_run", *GROUP_KEYS], sort=True):
        k = dict(zip(["run", *GROUP_KEYS], key))
        g = g.sort_values("size_bytes")
        x = g["size_bytes"].astype(float).to_numpy()
        f = bus_factor(kind, int(k["group_size"]))
        y = f * x / g["_t_s"].to_numpy() / 1e9  # the fit's statistic: per-iteration mean
        label = (f"{k['run']}: " if many_runs else "") + _group_label(
            {**k, "axis": ",".join(sorted(set(g["axis"].astype(str))))})
        (line,) = ax.plot(x, y, marker="o", linestyle="-", linewidth=1, label=label)
        if fits is not None:
            ft: Fit = fits.loc[tuple(key), "_fit"]
            xs = np.geomspace(x.min(), x.max(), 64)
            asym = f"busbw∞={f * ft.bandwidth_gbps:.3g} GB/s" if ft.beta_s_per_byte > 0 else \
                "β=0 (latency-bound sweep)"
            ax.plot(xs, f * xs / np.array([ft.time_s(s) for s in xs]) / 1e9, linestyle="--",
                    color=line.get_color(), linewidth=1.2,
                    label=f"α–β fit: α={ft.alpha_s * 1e6:.3g} µs, {asym}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
    ax.set_xlabel("message size S (bytes, log scale)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"{kind}: bus bandwidth vs message size")
    ax.grid(True, which="both", alpha=0.3)
    if c.empty:
        ax.text(0.5, 0.5, f"no {kind} rows with a group of more than one rank",
                ha="center", va="center", transform=ax.transAxes)
        ax.plot([], [], label="no data")
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------------
# GEMMs

def gemm_rows(df: pd.DataFrame) -> pd.DataFrame:
    """OK GEMM rows of the workload (the peak reference GEMM left out)."""
    g = _ok(df)
    g = g[(_col(g, "kind") == "gemm") & (_col(g, "op").fillna("") != "peak")]
    g = g[g["tflops"].notna()] if "tflops" in g.columns else g.iloc[0:0]
    return g.assign(_run=_runs(g), phase=_col(g, "phase", "fwd").fillna("fwd"))


def gemm_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per run, op and phase: shape, TFLOP/s, % of measured peak and % of spec peak."""
    g = gemm_rows(df)
    cols = ["_run", "op", "phase", "m", "n", "k", "batch", "dtype", "tflops", "pct_peak", "pct_spec_peak"]
    t = g[[c for c in cols if c in g.columns]].rename(columns={"_run": "run"}).reset_index(drop=True)
    for c in ("m", "n", "k", "batch"):  # ints, even where other rows' NaN made the column float
        if c in t.columns:
            t[c] = t[c].astype("Int64")
    return t


def gemm_tflops(df: pd.DataFrame, *, measured_peak: Mapping[str, float] | None = None,
                spec_peak: Mapping[str, float] | None = None) -> Figure:
    """Achieved TFLOP/s (2·m·n·k·batch / t) of every workload GEMM, grouped by op and phase, one
    bar per run; horizontal lines at each run's measured peak (the large square GEMM) and at
    the spec peak where known. ``measured_peak``/``spec_peak``: TFLOP/s by run label."""
    g = gemm_rows(df)
    fig = Figure(figsize=(max(8.0, 0.45 * max(1, g[["op", "phase"]].drop_duplicates().shape[0]) + 3), 5.0),
                 layout="constrained")
    ax = fig.add_subplot()
    if g.empty:
        ax.text(0.5, 0.5, "no GEMM rows", ha="center", va="center", transform=ax.transAxes)
        ax.bar([], [], label="no data")
    else:
        order = {"fwd": 0, "dgrad": 1, "wgrad": 2, "recompute": 3}
        cats = (g[["op", "phase"]].drop_duplicates()
                .assign(_o=lambda d: d["phase"].map(order).fillna(9))
                .sort_values(["op", "_o"]).drop(columns="_o"))
        names = [f"{o}\n{p}" for o, p in zip(cats["op"], cats["phase"])]
        runs = sorted(g["_run"].unique())
        width = 0.8 / len(runs)
        x = np.arange(len(names))
        for i, r in enumerate(runs):
            sub = g[g["_run"] == r].groupby(["op", "phase"])["tflops"].median()
            y = [sub.get((o, p), np.nan) for o, p in zip(cats["op"], cats["phase"])]
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, y, width, label=f"{r} GEMMs")
            color = bars.patches[0].get_facecolor() if bars.patches else None
            if measured_peak and r in measured_peak and measured_peak[r]:
                ax.axhline(measured_peak[r], color=color, linestyle="--", linewidth=1.2,
                           label=f"{r} measured peak {measured_peak[r]:.3g} TFLOP/s")
            if spec_peak and r in spec_peak and spec_peak[r]:
                ax.axhline(spec_peak[r], color=color, linestyle=":", linewidth=1.5,
                           label=f"{r} spec peak {spec_peak[r]:.3g} TFLOP/s")
        ax.set_xticks(x, names, fontsize="small")
    ax.set_xlabel("GEMM (op, phase)")
    ax.set_ylabel("achieved TFLOP/s per rank (2·m·n·k / t)")
    ax.set_title("Workload GEMMs: achieved TFLOP/s vs peak")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------------
# Predictions

def step_breakdown(predictions: Mapping[str, Any]) -> Figure:
    """The predicted step by share, one bar per prediction (``label → Prediction``): left, the
    share of each component (analysis.predict.COMPONENTS); right, the share that was measured,
    extrapolated and specified. Shares, not seconds, so a 1.6e5 s spec and a 116 s profile
    can be read side by side; each bar is labelled with its step time."""
    from analysis.predict import COMPONENTS
    labels = list(predictions)
    fig = Figure(figsize=(max(9.0, 3.6 * len(predictions) + 4), 5.8), layout="constrained")
    ax_c, ax_w = fig.subplots(1, 2)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for j, comp in enumerate(COMPONENTS):
        vals = np.array([predictions[k].breakdown_s.get(comp, 0.0) / predictions[k].step_time_s for k in labels])
        if not np.any(vals > 0):
            continue
        ax_c.bar(x, 100 * vals, 0.6, bottom=100 * bottom, label=comp, color=f"C{j % 10}",
                 hatch="//" if j >= 10 else "")
        bottom += vals
    colors = {"measured": "tab:green", "extrapolated": "tab:orange", "specified": "tab:gray"}
    bottom = np.zeros(len(labels))
    for w in PROVENANCE_WORDS:
        vals = np.array([predictions[k].seconds_by_provenance.get(w, 0.0) / predictions[k].step_time_s
                         for k in labels])
        ax_w.bar(x, 100 * vals, 0.6, bottom=100 * bottom, label=w, color=colors[w])
        for i, v in enumerate(vals):
            if v >= 0.04:
                ax_w.text(i, 100 * (bottom[i] + v / 2), f"{v:.0%}", ha="center", va="center", fontsize="small")
        bottom += vals
    for ax in (ax_c, ax_w):
        for i, k in enumerate(labels):
            ax.text(i, 101, f"{predictions[k].step_time_s:.4g} s", ha="center", va="bottom", fontsize="small")
        ax.set_xticks(x, [_wrap(k) for k in labels], fontsize="small")
        ax.set_ylim(0, 110)
        ax.set_xlabel("profile (measured run, or specification)")
        ax.set_ylabel("share of the predicted step (%)")
        ax.grid(True, axis="y", alpha=0.3)
    first = next(iter(predictions.values()), None)
    what = "" if first is None else f" — {first.config.model.name}, " \
        f"tp {first.config.parallel.tp} × pp {first.config.parallel.pp} × dp {first.config.parallel.dp}"
    ax_c.set_title(f"Step by component{what}", fontsize="medium")
    ax_w.set_title("Step by provenance", fontsize="medium")
    ax_c.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_w.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _wrap(s: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(s, width, break_on_hyphens=False)) or s


def predicted_vs_measured(table: pd.DataFrame) -> Figure:
    """Scatter of predicted against measured step time with the y = x line and ±20 % band;
    ``table`` columns: ``label``, ``measured_s``, ``predicted_s``."""
    fig = Figure(figsize=(6.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    if table.empty:
        ax.text(0.5, 0.5, "no cross-check data", ha="center", va="center", transform=ax.transAxes)
        ax.plot([], [], label="no data")
    else:
        for lab, g in table.groupby("label", sort=False):
            ax.scatter(g["measured_s"], g["predicted_s"], label=str(lab), s=40, zorder=3)
            for m, p in zip(g["measured_s"], g["predicted_s"]):
                ax.annotate(f"{100 * (p / m - 1):+.0f} %", (m, p), textcoords="offset points",
                            xytext=(6, 4), fontsize="small")
        lo = float(min(table["measured_s"].min(), table["predicted_s"].min())) * 0.7
        hi = float(max(table["measured_s"].max(), table["predicted_s"].max())) * 1.4
        xs = np.geomspace(lo, hi, 16)
        ax.plot(xs, xs, color="k", linewidth=1, label="predicted = measured")
        ax.fill_between(xs, xs * 0.8, xs * 1.2, color="k", alpha=0.08, label="±20 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (s, log scale)")
    ax.set_ylabel("predicted step time (s, log scale)")
    ax.set_title("Predicted vs measured step time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def projection(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """FOM and step time against node count (analysis.project rows), one line per profile."""
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    ax_t, ax_f = fig.subplots(1, 2)
    for label, rows in tables.items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            continue
        n = [r["nodes"] for r in ok]
        ax_t.plot(n, [r["step_time_s"] for r in ok], marker="o", label=label)
        ax_f.plot(n, [r["fom"] for r in ok], marker="o", label=label)
    for ax, what, unit in ((ax_t, "step time", "s"), (ax_f, "FOM", "(6sd²+s²d)·b·L / T, 1/s")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.set_xlabel("nodes (log scale; dp grows, tp × pp fixed)")
        ax.set_ylabel(f"{what} ({unit})")
        ax.set_title(f"Projected {what} vs node count")
        ax.grid(True, which="both", alpha=0.3)
        if not ax.lines:
            ax.plot([], [], label="no data")
        ax.legend(fontsize="small")
    return fig
