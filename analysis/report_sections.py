"""The sections of a report (:mod:`analysis.report`): collectives, GEMMs, the predicted
breakdown and its provenance, predicted vs measured, the projection. Each builder takes the
runs (and the directory the plots go to), returns :class:`Section` objects, and says "Skipped:
…" with the reason where its rows are absent, instead of drawing an empty plot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from microbench.model.config import TrainConfig, preset, with_layout
from microbench.model.vocabulary import PROVENANCE_WORDS, word_mix

from analysis import fits, plots
from analysis.errors import AnalysisError
from analysis.manifest import config_from_manifest
from analysis.measured import MeasuredProfile
from analysis.predict import COMPONENTS, Prediction, predict
from analysis.project import default_nodes, project
from analysis.spec import SpecProfile
from analysis.system import SystemProfile

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
    for kind in [k for k in fits.COLLECTIVE_KINDS if k in set(c["kind"])]:
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
             f"{cell_text(mp[r.label]) + ' TFLOP/s' if mp[r.label] else 'unknown (no peak_tflops, no peak row)'}, "
             f"spec peak {cell_text(sp[r.label]) + ' TFLOP/s' if sp[r.label] else 'unknown (no pct_spec_peak; give --system)'}"
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


BREAKDOWN_TITLE = "Predicted step-time breakdown"
PROJECTION_TITLE = "Projection: FOM and step time vs node count"


def prediction_sections(runs: Sequence[Run], out_dir: Path, written: list[str],
                        target: Target) -> list[Section]:
    """The predicted breakdown and its provenance, predicted vs measured, and the projection:
    each run's measured profile over the spec system, and the spec alone."""
    cfg, cfg_from = target_config(runs, target)
    named = [r.manifest.get("system") for r in runs if isinstance(r.manifest.get("system"), str)]
    if not (target.system or named):
        why = ("Skipped: no system named (give --system NAME, the spec that prices what the runs "
               "did not measure; the runs' manifests name none).")
        return [Section(BREAKDOWN_TITLE, why), Section(PROJECTION_TITLE, why)]
    spec = SpecProfile.from_yaml(target.system or named[0])
    sys_from = "--system" if target.system else "the run's manifest"
    profiles, notes = _profiles(runs, spec, include_failed=target.include_failed)
    preds = _predictions(cfg, profiles, notes)
    p = cfg.parallel
    head = (f"{cfg.model.name} (config from {cfg_from}); tp {p.tp} × pp {p.pp} × dp {p.dp} = "
            f"{p.world_size} ranks, global batch {p.global_batch}; system {spec.name} "
            f"({sys_from}) under whatever the run did not measure.")
    out = breakdown_sections(preds, out_dir, written, head=head, notes=notes)
    out.append(crosscheck_section(runs, profiles, out_dir, written, spec))
    out.append(projection_section(cfg, spec, profiles, out_dir, written, head=head))
    return out


def _profiles(runs: Sequence[Run], spec: SpecProfile, *,
              include_failed: bool) -> tuple[dict[str, SystemProfile], list[str]]:
    """Each run's measured profile over ``spec`` (or the spec alone, and why), then the spec."""
    notes, profiles = [], {}
    for r in runs:
        prof, note = run_profile(r, spec, include_failed=include_failed)
        notes += [f"{r.label}: {n}" for n in getattr(prof, "notes", [])]
        if note:
            notes.append(note)
        profiles[f"{r.label} over {spec.name}"] = prof
    profiles[f"spec {spec.name}"] = spec
    return profiles, notes


def _predictions(cfg: TrainConfig, profiles: Mapping[str, SystemProfile], notes: list[str]) -> dict[str, Prediction]:
    """The configuration predicted on every profile; a refusal becomes a note."""
    preds: dict[str, Prediction] = {}
    for label, prof in profiles.items():
        try:
            preds[label] = predict(cfg, prof)
        except ValueError as e:
            notes.append(f"{label}: no prediction ({e})")
    return preds


def breakdown_sections(preds: Mapping[str, Prediction], out_dir: Path, written: list[str], *,
                       head: str, notes: list[str]) -> list[Section]:
    """The breakdown by component and by provenance (plot and table), then every component's
    sources; one "Skipped" section where nothing could be predicted."""
    if not preds:
        return [Section(BREAKDOWN_TITLE, "Skipped: no prediction. " + head, notes=notes)]
    name = _save(plots.step_breakdown(preds), out_dir, "step_breakdown.png", written)
    t = pd.DataFrame({k: {**{c: v.breakdown_s.get(c, 0.0) for c in COMPONENTS},
                          "step_time_s": v.step_time_s, "mfu": v.mfu, "fom": v.fom,
                          **{f"{w}_s": v.seconds_by_provenance.get(w, 0.0) for w in PROVENANCE_WORDS},
                          **{f"{w}_pct": 100 * v.seconds_by_provenance.get(w, 0.0) / v.step_time_s
                             for w in PROVENANCE_WORDS}}
                      for k, v in preds.items()}).rename_axis("component (s)").reset_index()
    return [Section(BREAKDOWN_TITLE,
                    "The predicted time of one training step (analysis.predict: every op of the "
                    "workload priced by the profile, composed over the 1F1B schedule), on each "
                    "run's measured profile and on the specification alone, as shares of the "
                    "step (each bar is labelled with its seconds, so profiles whose steps differ "
                    "by orders of magnitude stay readable). Left: by component; the largest block "
                    "limits the step. Right: how much of the step was measured (at exactly the "
                    "priced shape and group), extrapolated (from a smaller group, a scaled-down "
                    "GEMM, a shorter sweep) or specified (a spec file's key); rows "
                    "measured_s/extrapolated_s/specified_s of the table give the seconds. " + head,
                    figure=name, table=t, notes=notes),
            provenance_section(preds)]


def projection_section(cfg: TrainConfig, spec: SpecProfile, profiles: Mapping[str, SystemProfile],
                       out_dir: Path, written: list[str], *, head: str) -> Section:
    """FOM and step time at node counts of the spec machine (powers of two up to the whole
    machine), on every profile."""
    tables, notes = {}, []
    try:
        nodes = default_nodes(cfg, spec)
    except ValueError as e:
        nodes, notes = [], [str(e)]
    for label, prof in (profiles.items() if nodes else ()):
        try:
            tables[label] = project(cfg, prof, nodes)
        except ValueError as e:
            notes.append(f"{label}: {e}")
    if not any("error" not in r for v in tables.values() for r in v):
        return Section(PROJECTION_TITLE, "Skipped: no node count gave a valid layout. " + head, notes=notes)
    rows = [{"profile": k, **{c: r.get(c) for c in ("nodes", "dp", "global_batch", "step_time_s", "fom", "mfu",
                                                      "time_to_train_days", "error")}}
            for k, v in tables.items() for r in v]
    name = _save(plots.projection(tables), out_dir, "projection.png", written)
    long = pd.DataFrame(rows)
    long = long[long["step_time_s"].notna()] if "step_time_s" in long.columns else long
    t = long.pivot_table(index="nodes", columns="profile", values=["step_time_s", "fom"], sort=False)
    t.columns = [f"{p} {'step s' if v == 'step_time_s' else 'FOM'}" for v, p in t.columns]
    t = t.reset_index()
    return Section(PROJECTION_TITLE,
                   "Weak scaling as a larger allocation would run it (analysis.project): tp × pp "
                   "and the micro-batches per pipeline fixed, dp grown with the nodes, so the "
                   "global batch grows too. FOM = (6·s·d² + s²·d)·b·L / T exactly as the "
                   "benchmark defines it. " + head, figure=name, table=t, notes=notes)


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
    summary = [f"{label}: {pr.step_time_s:.4g} s — " + word_mix(pr.seconds_by_provenance)
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



def cell_text(v: Any) -> str:
    """A table cell or a figure in a note: 4 significant digits, empty for a missing value."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

