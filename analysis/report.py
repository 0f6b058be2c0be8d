"""A report of one run, or several side by side: Markdown (default) or HTML, PNG plots beside it.

    python -m analysis.report RUN_DIR [RUN_DIR …] [--out DIR] [--format md|html] [--force]
                              [--model PRESET] [--system NAME]

Sections: bus bandwidth vs message size per collective kind with α–β fits; GEMM TFLOP/s
against measured and spec peak; the predicted step-time breakdown (analysis.predict on each
run's measured profile, over a spec for whatever was not measured); predicted vs measured
step time where the run holds a training summary (``kind == 'train_summary'``) or a
``crosscheck.csv``/``crosscheck.jsonl`` file; FOM and step time vs node count
(analysis.project). A section whose rows are absent says so instead of drawing an empty plot.

Runs are compared only when their key metadata agree (pyperf's rule): device, backend, torch
version, schema version and world size. A mismatch is refused with one line naming the
field and both values (exit 2) unless ``--force``. Bad input is one ``error: …`` line, exit 2.
"""
from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from microbench.cli import ArgumentParser
from microbench.config import ModelConfig, ParallelConfig, TrainConfig, preset, with_layout
from microbench.results import iter_run_dirs, read_run

from . import plots
from .load import load_run
from .manifest import config_from_manifest
from .predict import COMPONENTS, Prediction, predict
from .errors import AnalysisError
from .predict import word_shares
from .profile import MeasuredProfile, SpecProfile, SystemProfile
from .project import default_nodes, project
from .provenance import WORDS

CHECKED = ("device", "backend", "versions.torch", "schema_version", "world_size")
DEFAULT_MODEL = "alcf-1t"  # the benchmark's target configuration (DESIGN.md)
CROSSCHECK_FILES = ("crosscheck.csv", "crosscheck.jsonl")


ReportError = AnalysisError
"""Input the report cannot use (the analysis layer's one error type); ``error: …``, exit 2."""


@dataclass(frozen=True)
class Target:
    """What to predict: a model preset and a spec system (under the measured parts: named by
    the user or by the run's manifest, never a default)."""
    model: str | None = None
    system: str | None = None
    include_failed: bool = False


@dataclass
class Run:
    dir: Path
    manifest: dict[str, Any]
    rows: pd.DataFrame
    label: str


@dataclass
class Section:
    title: str
    text: str
    figure: str | None = None
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def _dotted(d: Mapping[str, Any], key: str) -> Any:
    cur: Any = d
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return cur


def check_metadata(runs: Sequence[Run], *, force: bool = False) -> list[str]:
    """Refuse runs whose checked metadata differ; with ``force``, return the differences."""
    diffs = []
    for key in CHECKED:
        first = runs[0]
        for r in runs[1:]:
            a, b = _dotted(first.manifest, key), _dotted(r.manifest, key)
            if a != b:
                msg = f"runs differ in {key}: {a!r} ({first.dir}) vs {b!r} ({r.dir})"
                if not force:
                    raise ReportError(msg + "; pass --force to compare them anyway")
                diffs.append(msg)
    return diffs


def read_runs(run_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    dirs = list(run_dirs)
    if not dirs:
        raise ReportError("no run directory given")
    runs, seen = [], {}
    for d in iter_run_dirs(dirs):
        manifest, _ = read_run(d)
        rows = load_run(d)
        label = f"{manifest.get('hostname', '?')}/{manifest.get('device', '?')}/{manifest.get('run_id', d.name)}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label += f"#{seen[label]}"
        runs.append(Run(Path(d), manifest, rows.assign(_run=label), label))
    return runs


# ---------------------------------------------------------------------------------------------
# Configs and profiles

def target_config(runs: Sequence[Run], target: Target) -> tuple[TrainConfig, str]:
    if target.model:
        return preset(target.model), f"--model {target.model}"
    for r in runs:
        cfg = config_from_manifest(r.manifest)
        if cfg is not None:
            return cfg, f"the manifest of {r.dir}"
    return preset(DEFAULT_MODEL), f"default ({DEFAULT_MODEL}: no run names a model)"


def run_profile(run: Run, spec: SpecProfile, *, include_failed: bool = False) -> tuple[SystemProfile, str | None]:
    """The run's measured profile over ``spec``; the spec alone (and why) if nothing is usable."""
    try:
        return MeasuredProfile.from_rows(run.rows, fallback=spec, name=run.label,
                                         include_failed=include_failed), None
    except (KeyError, TypeError) as e:
        raise ReportError(f"{run.dir}: rows unusable for a profile ({type(e).__name__}: {e})") from None
    except ValueError as e:
        return spec, f"{run.label}: no measured profile ({e}); used the {spec.name} spec alone"


def measured_peak(run: Run) -> float | None:
    """Measured peak TFLOP/s: manifest ``peak_tflops`` (a number, or by dtype: the GEMMs'
    dtype), else the fastest ``op == 'peak'`` row."""
    pk = run.manifest.get("peak_tflops")
    g = plots.gemm_rows(run.rows)
    dtype = g["dtype"].mode().iat[0] if "dtype" in g.columns and g["dtype"].notna().any() else None
    if isinstance(pk, Mapping) and pk:
        v = pk.get(dtype) if dtype in pk else max(pk.values())
        return float(v) if v else None
    if isinstance(pk, (int, float)) and pk:
        return float(pk)
    df = plots._ok(run.rows)
    if "op" in df.columns and "tflops" in df.columns:
        p = df[(df["op"] == "peak") & df["tflops"].notna()]
        if len(p):
            return float(p["tflops"].max())
    return None


def spec_peak(run: Run, system: str | None) -> float | None:
    """Spec peak TFLOP/s: from rows' ``pct_spec_peak`` (tflops / pct · 100), else the named
    system's peak for the GEMMs' dtype when ``--system`` was given."""
    g = plots.gemm_rows(run.rows)
    if "pct_spec_peak" in g.columns:
        s = g[g["pct_spec_peak"].notna() & (g["pct_spec_peak"] > 0)]
        if len(s):
            return float((s["tflops"] * 100 / s["pct_spec_peak"]).median())
    if system and len(g) and "dtype" in g.columns:
        try:
            return SpecProfile.from_yaml(system).peak_for(str(g["dtype"].mode().iat[0]))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# Sections

def _save(fig, out_dir: Path, name: str, written: list[str]) -> str:
    fig.savefig(out_dir / name, dpi=100)
    written.append(name)
    return name


def collective_sections(runs: Sequence[Run], df: pd.DataFrame, out_dir: Path, written: list[str]) -> list[Section]:
    c = plots.collective_rows(df)
    if c.empty:
        return [Section("Collectives: bus bandwidth vs message size",
                        "Skipped: no collective rows over a group of more than one rank in "
                        + ("this run." if len(runs) == 1 else "these runs."))]
    out = []
    for kind in [k for k in plots.COLLECTIVE_KINDS if k in set(c["kind"])]:
        name = _save(plots.busbw_vs_size(df, kind), out_dir, f"collectives_{kind}.png", written)
        t = plots.collective_fits(df, kind).drop(columns=["_fit"])
        out.append(Section(
            f"Collectives: {kind} bus bandwidth vs message size",
            f"Bus bandwidth as nccl-tests defines it (busbw = algbw × factor; for {kind} the factor "
            f"is {_factor_text(kind)}), one series per group: mesh axis, group size n and the number "
            "of groups running at once. Dashed lines: the α–β fit t = α + β·S (analysis.fits, "
            "relative least squares), shown as busbw; α is the latency, busbw∞ the asymptote the "
            "predictor uses for large messages. A large fit residual means the sweep crosses a "
            "protocol or algorithm switch. Points and fits are exactly what the measured profile "
            "prices from (analysis.fits.collective_points): the per-iteration mean, out-of-place "
            "points where a sweep has both, derived rows (the DP probe's extrapolated whole-step "
            "row) left out.",
            figure=name, table=t))
    return out


def _factor_text(kind: str) -> str:
    return {"allreduce": "2(n−1)/n", "allgather": "(n−1)/n", "reduce_scatter": "(n−1)/n",
            "alltoall": "(n−1)/n"}.get(kind, "1")


def gemm_section(runs: Sequence[Run], df: pd.DataFrame, out_dir: Path, written: list[str],
                 system: str | None) -> Section:
    title = "GEMMs: achieved TFLOP/s vs peak"
    if plots.gemm_rows(df).empty:
        return Section(title, "Skipped: no GEMM rows (op other than 'peak') in "
                       + ("this run." if len(runs) == 1 else "these runs."))
    mp = {r.label: measured_peak(r) for r in runs}
    sp = {r.label: spec_peak(r, system) for r in runs}
    name = _save(plots.gemm_tflops(df, measured_peak=mp, spec_peak=sp), out_dir, "gemm_tflops.png", written)
    with_gemms = [r for r in runs if not plots.gemm_rows(r.rows).empty]
    notes = [f"{r.label}: measured peak "
             f"{_num(mp[r.label]) + ' TFLOP/s' if mp[r.label] else 'unknown (no peak_tflops, no peak row)'}, "
             f"spec peak {_num(sp[r.label]) + ' TFLOP/s' if sp[r.label] else 'unknown (no pct_spec_peak; give --system)'}"
             for r in with_gemms]
    return Section(title, "Each bar is one GEMM of the workload (the exact shapes of one layer on one "
                   "rank: forward, dgrad, wgrad), at 2·m·n·k·batch / t. Dashed: the run's measured "
                   "peak (a large square GEMM in the same dtype); dotted: the specification's peak. "
                   "The gap between a bar and the measured peak is shape efficiency (tile and wave "
                   "quantization, small k); between the peaks, what the device delivers of its spec.",
                   figure=name, table=_with_pct(plots.gemm_table(df), mp), notes=notes)


def _with_pct(t: pd.DataFrame, peaks: Mapping[str, float | None]) -> pd.DataFrame:
    """Fill ``pct_peak`` (of the run's measured peak) where a probe ran without its own peak."""
    pct = 100 * t["tflops"] / t["run"].map(lambda r: peaks.get(r) or float("nan"))
    return t.assign(pct_peak=t["pct_peak"].fillna(pct) if "pct_peak" in t.columns else pct)


def prediction_sections(runs: Sequence[Run], out_dir: Path, written: list[str],
                        target: Target) -> list[Section]:
    cfg, cfg_from = target_config(runs, target)
    named = [r.manifest.get("system") for r in runs if isinstance(r.manifest.get("system"), str)]
    if not (target.system or named):
        why = ("Skipped: no system named (give --system NAME, the spec that prices what the runs "
               "did not measure; the runs' manifests name none).")
        return [Section("Predicted step-time breakdown", why), Section("Projection: FOM and step time vs node count", why)]
    sysname = target.system or named[0]
    sys_from = "--system" if target.system else "the run's manifest"
    spec = SpecProfile.from_yaml(sysname)
    notes, profiles = [], {}
    for r in runs:
        prof, note = run_profile(r, spec, include_failed=target.include_failed)
        notes += [f"{r.label}: {n}" for n in getattr(prof, "notes", [])]
        if note:
            notes.append(note)
        profiles[f"{r.label} over {spec.name}"] = prof
    profiles[f"spec {spec.name}"] = spec
    preds: dict[str, Prediction] = {}
    for label, prof in profiles.items():
        try:
            preds[label] = predict(cfg, prof)
        except ValueError as e:
            notes.append(f"{label}: no prediction ({e})")
    p = cfg.parallel
    head = (f"{cfg.model.name} (config from {cfg_from}); tp {p.tp} × pp {p.pp} × dp {p.dp} = "
            f"{p.world_size} ranks, global batch {p.global_batch}; system {spec.name} "
            f"({sys_from}) under whatever the run did not measure.")
    out = []
    if preds:
        name = _save(plots.step_breakdown(preds), out_dir, "step_breakdown.png", written)
        t = pd.DataFrame({k: {**{c: v.breakdown_s.get(c, 0.0) for c in COMPONENTS},
                              "step_time_s": v.step_time_s, "mfu": v.mfu, "fom": v.fom,
                              **{f"{w}_s": v.seconds_by_provenance.get(w, 0.0) for w in WORDS},
                              **{f"{w}_pct": 100 * v.seconds_by_provenance.get(w, 0.0) / v.step_time_s
                                 for w in WORDS}}
                          for k, v in preds.items()}).rename_axis("component (s)").reset_index()
        out.append(Section("Predicted step-time breakdown",
                           "The predicted time of one training step (analysis.predict: every op of the "
                           "workload priced by the profile, composed over the 1F1B schedule), on each "
                           "run's measured profile and on the specification alone, as shares of the "
                           "step (each bar is labelled with its seconds, so profiles whose steps differ "
                           "by orders of magnitude stay readable). Left: by component; the largest block "
                           "limits the step. Right: how much of the step was measured (at exactly the "
                           "priced shape and group), extrapolated (from a smaller group, a scaled-down "
                           "GEMM, a shorter sweep) or specified (a spec file's key); rows "
                           "measured_s/extrapolated_s/specified_s of the table give the seconds. " + head,
                           figure=name, table=t, notes=notes))
        out.append(provenance_section(preds))
    else:
        out.append(Section("Predicted step-time breakdown", "Skipped: no prediction. " + head, notes=notes))
    out.append(crosscheck_section(runs, profiles, out_dir, written, spec))
    # Projection: node counts of the spec machine (powers of two up to the whole machine).
    tables, proj_notes = {}, []
    try:
        nodes = default_nodes(cfg, spec)
    except ValueError as e:
        nodes, proj_notes = [], [str(e)]
    for label, prof in (profiles.items() if nodes else ()):
        try:
            tables[label] = project(cfg, prof, nodes)
        except ValueError as e:
            proj_notes.append(f"{label}: {e}")
    rows = [{"profile": k, **{c: r.get(c) for c in ("nodes", "dp", "global_batch", "step_time_s", "fom", "mfu",
                                                      "time_to_train_days", "error")}}
            for k, v in tables.items() for r in v]
    if any("error" not in r for v in tables.values() for r in v):
        name = _save(plots.projection(tables), out_dir, "projection.png", written)
        long = pd.DataFrame(rows)
        long = long[long["step_time_s"].notna()] if "step_time_s" in long.columns else long
        t = long.pivot_table(index="nodes", columns="profile", values=["step_time_s", "fom"], sort=False)
        t.columns = [f"{p} {'step s' if v == 'step_time_s' else 'FOM'}" for v, p in t.columns]
        t = t.reset_index()
        out.append(Section("Projection: FOM and step time vs node count",
                           "Weak scaling as a larger allocation would run it (analysis.project): tp × pp "
                           "and the micro-batches per pipeline fixed, dp grown with the nodes, so the "
                           "global batch grows too. FOM = (6·s·d² + s²·d)·b·L / T exactly as the "
                           "benchmark defines it. " + head, figure=name, table=t, notes=proj_notes))
    else:
        out.append(Section("Projection: FOM and step time vs node count",
                           "Skipped: no node count gave a valid layout. " + head, notes=proj_notes))
    return out


def provenance_section(preds: Mapping[str, Prediction]) -> Section:
    """Every component of every prediction with its seconds and where they came from."""
    rows = []
    for label, pr in preds.items():
        for comp, t in pr.breakdown_s.items():
            for src, sec in sorted(pr.provenance_s.get(comp, {}).items(), key=lambda kv: -kv[1]):
                rows.append({"profile": label, "component": comp, "seconds": sec,
                             "pct_of_step": 100 * sec / pr.step_time_s, "source": src})
        for key in ("peak", "memory", "overlap.tp", "overlap.dp"):
            if key in pr.sources:
                rows.append({"profile": label, "component": key, "seconds": None, "pct_of_step": None,
                             "source": pr.sources[key]})
    summary = [f"{label}: {pr.step_time_s:.4g} s — " + word_shares(pr.seconds_by_provenance)
               for label, pr in preds.items()]
    return Section("Provenance of each predicted component",
                   "Each component's seconds split by source: measured (at exactly the shape and group "
                   "priced), extrapolated (and from what) or specified (spec file and key). A clamp or "
                   "substitution is part of the source's text. The bubble carries the sources of the "
                   "stage it idles for.", table=pd.DataFrame(rows), notes=summary)


def _row_config(row: Mapping[str, Any], manifest: Mapping[str, Any]) -> TrainConfig:
    base = config_from_manifest(manifest)
    if base is None or base.model.name != row.get("model"):
        base = preset(str(row.get("model")))
    keys = ("tp", "pp", "dp", "micro_batch", "global_batch", "recompute", "sequence_parallel",
            "zero_stage", "seq_len", "dtype")
    ch = {}
    for k in keys:
        v = row.get(k)
        v = v.item() if hasattr(v, "item") else v
        if v is None or v != v:  # absent, or NaN from a column other rows lack
            continue
        ch[k] = int(v) if isinstance(v, float) and v.is_integer() else v
    return with_layout(base, **ch)


def crosscheck_table(runs: Sequence[Run], profiles: Mapping[str, SystemProfile],
                     spec: SpecProfile) -> tuple[pd.DataFrame, list[str]]:
    """measured vs predicted step time: ``train_summary`` rows (predicted on their own run's
    profile) and any ``crosscheck.csv``/``.jsonl`` in a run directory (label, measured_s, predicted_s)."""
    out, notes = [], []
    for r in runs:
        prof = profiles.get(f"{r.label} over {spec.name}", spec)
        ts = plots._ok(r.rows)
        ts = ts[ts["kind"] == "train_summary"] if "kind" in ts.columns else ts.iloc[0:0]
        for _, row in ts.iterrows():
            try:
                cfg = _row_config(row.to_dict(), r.manifest)
                pr = predict(cfg, prof)
            except ValueError as e:
                notes.append(f"{r.label}: train_summary not predicted ({e})")
                continue
            p = cfg.parallel
            out.append({"label": r.label, "source": "train_summary",
                        "config": f"{cfg.model.name} tp{p.tp} pp{p.pp} dp{p.dp} mbs{p.micro_batch} gbs{p.global_batch}",
                        "measured_s": float(plots.time_s(row.to_frame().T).iat[0]),
                        "predicted_s": pr.step_time_s})
        for fname in CROSSCHECK_FILES:
            f = r.dir / fname
            if not f.is_file():
                continue
            try:
                x = pd.read_csv(f) if f.suffix == ".csv" else pd.read_json(f, lines=True)
            except ValueError as e:
                raise ReportError(f"{f}: unreadable ({e})") from None
            missing = {"measured_s", "predicted_s"} - set(x.columns)
            if missing:
                raise ReportError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
            for _, row in x.iterrows():
                out.append({"label": f"{r.label} ({fname})", "source": fname,
                            "config": str(row.get("config", row.get("label", ""))),
                            "measured_s": float(row["measured_s"]), "predicted_s": float(row["predicted_s"])})
    t = pd.DataFrame(out, columns=["label", "source", "config", "measured_s", "predicted_s"])
    if len(t):
        t["error_pct"] = 100 * (t["predicted_s"] / t["measured_s"] - 1)
    return t, notes


def crosscheck_section(runs, profiles, out_dir, written, spec) -> Section:
    title = "Predicted vs measured step time"
    t, notes = crosscheck_table(runs, profiles, spec)
    if t.empty:
        return Section(title, "Skipped: no cross-check data (no row with kind 'train_summary' and no "
                       f"{' or '.join(CROSSCHECK_FILES)} in the run directory). Run "
                       "`python -m full_model.train` into the run, or parse a Megatron-DeepSpeed log "
                       "(`python -m full_model.megatron parse`).", notes=notes)
    name = _save(plots.predicted_vs_measured(t), out_dir, "predicted_vs_measured.png", written)
    return Section(title, "Each point is one measured training configuration (the reference 3D-parallel "
                   "step's median over its iterations after warm-up) against the predictor on the "
                   "same run's measured profile. On the diagonal the composition of measured components "
                   f"explains the step; the band is ±20 %. Median |error| {t['error_pct'].abs().median():.1f} %.",
                   figure=name, table=t, notes=notes)


# ---------------------------------------------------------------------------------------------
# Rendering

def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(t: pd.DataFrame) -> str:
    cols = [str(c) for c in t.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in t.iterrows():
        lines.append("| " + " | ".join(_num(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |")
    return "\n".join(lines)


def render(sections: Sequence[Section], header: Section, fmt: str, written: Sequence[str]) -> str:
    allsec = [header, *sections]
    if fmt == "md":
        parts = [f"# {header.title}", ""]
        for i, s in enumerate(allsec):
            if i:
                parts += [f"## {s.title}", ""]
            parts += [s.text, ""]
            if s.figure:
                parts += [f"![{s.title}]({s.figure})", ""]
            parts += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
            if s.table is not None and len(s.table):
                parts += [_md_table(s.table), ""]
        parts += ["## Plot files", ""] + [f"- {w}" for w in written] + [""]
        return "\n".join(parts)
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{e(header.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:"
             "collapse;font-size:small}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
             f"<h1>{e(header.title)}</h1>"]
    for i, s in enumerate(allsec):
        if i:
            parts.append(f"<h2>{e(s.title)}</h2>")
        parts.append(f"<p>{e(s.text)}</p>")
        if s.figure:
            parts.append(f"<img src='{e(s.figure)}' alt='{e(s.title)}'>")
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
        if s.table is not None and len(s.table):
            parts.append(s.table.map(_num).to_html(index=False, escape=True))
    parts += ["<h2>Plot files</h2><ul>"] + [f"<li>{e(w)}</li>" for w in written] + ["</ul></body></html>"]
    return "\n".join(parts)


def _header(runs: Sequence[Run], diffs: Sequence[str]) -> Section:
    t = pd.DataFrame([{"run": r.label, "dir": str(r.dir), "host": r.manifest.get("hostname"),
                       "device": r.manifest.get("device"), "device_name": r.manifest.get("device_name"),
                       "backend": r.manifest.get("backend"), "world_size": r.manifest.get("world_size"),
                       "torch": _dotted(r.manifest, "versions.torch"), "model": r.manifest.get("model"),
                       "start_time": r.manifest.get("start_time"), "num_rows": len(r.rows),
                       "probes": ", ".join(sorted(map(str, r.rows["probe"].dropna().unique())))
                       if "probe" in r.rows.columns else ""} for r in runs])
    title = "llm-microbench report: " + ", ".join(r.label for r in runs)
    text = ("One run." if len(runs) == 1 else f"{len(runs)} runs side by side, overlaid in every plot "
            f"and told apart by host/device/run_id; checked metadata ({', '.join(CHECKED)}) "
            + ("agree." if not diffs else "DIFFER (compared with --force):"))
    return Section(title, text, table=t, notes=list(diffs))


def build_report(run_dirs: Iterable[str | os.PathLike], *, out_dir: str | os.PathLike | None = None,
                 fmt: str = "md", force: bool = False, target: Target | tuple | None = None) -> Path:
    """Write ``report.md`` (or ``report.html``) and its PNG plots into ``out_dir`` and return the
    report's path. ``out_dir`` defaults to ``RUN_DIR/report`` for one run, else
    ``report-<run ids>`` in the working directory. Raises :class:`ReportError` (a ValueError)
    or :class:`microbench.results.ResultsError` on bad input or mismatched runs."""
    if fmt not in ("md", "html"):
        raise ReportError(f"format must be 'md' or 'html', got {fmt!r}")
    if isinstance(target, tuple):
        target = Target(*target)
    target = target or Target()
    runs = read_runs(run_dirs)
    diffs = check_metadata(runs, force=force)
    if out_dir is None:
        out_dir = runs[0].dir / "report" if len(runs) == 1 else \
            Path("report-" + "-".join(str(r.manifest.get("run_id", r.dir.name)) for r in runs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.concat([r.rows for r in runs], ignore_index=True, sort=False)
    written: list[str] = []
    sections = [*collective_sections(runs, df, out, written),
                gemm_section(runs, df, out, written, target.system),
                *prediction_sections(runs, out, written, target)]
    path = out / f"report.{fmt}"
    path.write_text(render(sections, _header(runs, diffs), fmt, written), encoding="utf-8")
    return path



def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or a parent of several)")
    ap.add_argument("--out", help="output directory (default RUN_DIR/report, or report-<ids> for several)")
    ap.add_argument("--format", choices=("md", "html"), default="md")
    ap.add_argument("--force", action="store_true", help="compare runs whose checked metadata differ")
    ap.add_argument("--model", help=f"model preset to predict (default: the run's, else {DEFAULT_MODEL})")
    ap.add_argument("--system", help="spec system under the measured profile (default: the one the run's "
                                     "manifest names; with neither, no prediction)")
    ap.add_argument("--include-failed", action="store_true",
                    help="leave failed rows out of the measured profile instead of refusing it")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    try:
        path = build_report(a.run_dirs, out_dir=a.out, fmt=a.format, force=a.force,
                            target=Target(model=a.model, system=a.system, include_failed=a.include_failed))
    except (ValueError, OSError) as e:  # ResultsError and ReportError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
