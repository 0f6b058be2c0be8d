"""Cross-check: predicted vs measured step time, with the breakdown side by side.

    python -m analysis.crosscheck compare RUN_DIR --profile PROBE_DIRS... [--system NAME]
    python -m analysis.crosscheck compare train.log --model alcf-1t --tp 12 --pp 64 --dp 1 \\
        --mbs 1 --gbs 512 --system aurora
    python -m analysis.crosscheck local --layouts tp2,pp2,dp2
    python -m analysis.crosscheck megatron [--source DIR] --layouts tp2,pp2,dp2,tp2pp2 [--json]

A measured run is a reference-step run directory (``python -m full_model.train``: the
configuration is read from its manifest, the step time from its summary row) or a parsed
Megatron-DeepSpeed log (the configuration is stated with --model and the layout flags and
checked against what the log says). Measured step time = median over the iterations after
the warm-up, with min/max/stdev as the spread. Error % = (predicted − measured) / measured.

The breakdown maps the run's timers onto the predictor's components: ``compute`` (forward +
backward timers: GEMMs, attention, memory-bound ops, recompute, TP collectives, embedding and
head, per-layer overhead), ``p2p_wait`` (pipeline p2p + the bubble: in 1F1B the bubble *is*
time spent waiting on a neighbour), ``dp_sync`` and ``optimizer``. The run's timers are those
of its slowest stage (``timers_us_bottleneck``), which add up to about the step.

``local`` runs the whole loop on this machine for each layout: the probes at the reference
step's exact shapes (same rank count, so the cores are as busy as in the step), a measured
profile from their rows, the prediction, the reference step, and the comparison table.
``megatron`` does the same against the real Megatron-DeepSpeed (:mod:`analysis.crosscheck.megatron`).
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from microbench.runtime.results import read_run
from microbench.runtime.rowcheck import is_amount
from microbench.model.config import TrainConfig

from analysis.manifest import config_from_manifest
from analysis.predict import Prediction, predict
from analysis.system import SystemProfile
from microbench.model.vocabulary import BREAKDOWN_TIMERS, COMPONENT_TIMER, MEGATRON_TIMERS, REFERENCE_TIMERS

if TYPE_CHECKING:
    import pandas as pd

SHAPE_FIELDS = ("num_layers", "hidden", "num_heads", "num_kv_heads", "ffn_hidden", "gated_mlp",
                "seq_len", "vocab_size", "dtype")


class CrossCheckError(ValueError):
    """Bad input (a configuration mismatch, an unreadable run): one line, exit code 2."""


@dataclass
class MeasuredStep:
    """A measured training step: its configuration and the step times the statistic is over."""

    config: TrainConfig
    step_times_s: list[float]
    """Iterations after the warm-up (the ones the statistic is over)."""
    source: str
    warmup: int
    timers_s: dict[str, float] | None = None
    """Measured breakdown by BREAKDOWN_TIMERS, or None where the run has no timers."""
    dp_overlap: bool = True
    """Whether the run overlaps the DP gradient sync with the backward (the reference step does not)."""
    notes: list[str] = field(default_factory=list)
    """What reading the measurement changed or found (a log's repeated lines, restarts, bad records)."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def spread_s(self) -> dict[str, float]:
        xs = self.step_times_s
        return {"min": min(xs), "max": max(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


@dataclass
class Comparison:
    label: str
    measured: MeasuredStep
    prediction: Prediction
    notes: list[str] = field(default_factory=list)

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.prediction.step_time_s - self.measured.median_s) / self.measured.median_s

    @property
    def predicted_groups_s(self) -> dict[str, float]:
        out = dict.fromkeys(BREAKDOWN_TIMERS, 0.0)
        for k, v in self.prediction.breakdown_s.items():
            out[COMPONENT_TIMER.get(k, "compute")] += v
        return out

    def to_dict(self) -> dict[str, Any]:
        m = self.measured
        return {"label": self.label, "source": m.source, "measured_s": m.median_s, "spread_s": m.spread_s,
                "num_iterations": len(m.step_times_s), "warmup": m.warmup,
                "predicted_s": self.prediction.step_time_s, "error_pct": self.error_pct,
                "measured_breakdown_s": m.timers_s, "predicted_breakdown_s": self.predicted_groups_s,
                "predicted_components_s": self.prediction.breakdown_s, "notes": self.notes,
                "model": dataclasses.asdict(m.config.model), "parallel": dataclasses.asdict(m.config.parallel)}


# ---------------------------------------------------------------------------------------------
# Measured runs


def measured_from_run(run_dir: str | Path) -> MeasuredStep:
    """A ``full_model.train`` run directory: config from the manifest, time from the summary."""
    try:
        manifest, rows = read_run(run_dir)
    except ValueError as e:
        raise CrossCheckError(str(e)) from None
    try:
        cfg = config_from_manifest(manifest, str(run_dir))
    except ValueError as e:
        raise CrossCheckError(str(e)) from None
    if cfg is None:
        raise CrossCheckError(f"{run_dir}: manifest has no config and no model")
    summary = [r for r in rows if r.get("kind") == "train_summary" and r.get("status") == "ok"]
    if not summary:
        failed = [r.get("reason") for r in rows if r.get("status") == "failed"]
        why = f": {failed[0]}" if failed else " (did the run finish?)"
        raise CrossCheckError(f"{run_dir}: no train_summary row{why}")
    s = summary[-1]
    samples = s.get("time_us_samples")
    if not isinstance(samples, list) or not samples or 0 in samples:  # each a finite number ≥ 0 (read_run)
        raise CrossCheckError(f"{run_dir}: its train_summary row has no step times (time_us_samples "
                              f"{samples!r}: a non-empty list of times > 0)")
    key = "timers_us_bottleneck" if s.get("timers_us_bottleneck") else "timers_us"
    timers = s.get(key)
    groups = None
    if timers:
        bad = next((f"{k}: {v!r}" for k, v in timers.items() if not is_amount(v)),
                   None) if isinstance(timers, dict) else f"a {type(timers).__name__}, not an object"
        if bad:
            raise CrossCheckError(f"{run_dir}: its train_summary row's {key} is not timer → µs ≥ 0 ({bad})")
        us = dict.fromkeys(BREAKDOWN_TIMERS, 0.0)
        for name, timer in REFERENCE_TIMERS.items():
            us[timer] += timers.get(name, 0)
        groups = {k: v / 1e6 for k, v in us.items()}
    return MeasuredStep(config=cfg, step_times_s=[t / 1e6 for t in samples], source=str(run_dir),
                    warmup=int(s.get("warmup", 0)), timers_s=groups,
                    dp_overlap=bool(manifest.get("dp_overlap", True)))


def measured_from_log(path: str | Path, cfg: TrainConfig, *, warmup: int = 1) -> MeasuredStep:
    """A Megatron-DeepSpeed log, checked against the stated configuration."""
    from full_model.megatron.logparse import parse_log
    res = parse_log(path)
    it = res.iterations
    it = it[it["elapsed_ms"].notna()] if len(it) else it
    if len(it) == 0:
        raise CrossCheckError(f"{path}: no iteration lines with an elapsed time "
                              f"({len(res.unreadable)} unreadable line(s))")
    for col, want, flag in (("global_batch_size", cfg.parallel.global_batch, "--gbs"),
                            ("seq_len", cfg.model.seq_len, "--seq / the preset's seq_len")):
        got = sorted({int(v) for v in it[col].dropna()}) if col in it.columns else []
        if got and got != [want]:
            raise CrossCheckError(f"{path}: the log has {col}={','.join(map(str, got))} but the configuration "
                                  f"has {want} ({flag}): not the same run")
    kept, notes = _steady(it, res.warnings, warmup=warmup, path=path)
    if len(kept) == 0:
        raise CrossCheckError(f"{path}: {len(it)} iteration(s), all inside the warm-up ({warmup}); "
                              "lower --warmup-steps or give a longer log")
    groups = None
    t = res.timers
    if len(t):
        t = t[t["name"].isin(MEGATRON_TIMERS)]
        if len(t):
            groups = dict.fromkeys(BREAKDOWN_TIMERS, 0.0)
            for name, grp in t.groupby("name"):
                groups[MEGATRON_TIMERS[name]] += float(grp["time_ms"].median()) / 1e3
    return MeasuredStep(config=cfg, step_times_s=[float(x) / 1e3 for x in kept["elapsed_ms"]], source=str(path),
                    warmup=warmup, timers_s=groups, notes=notes)


def _steady(it: pd.DataFrame, warnings: Sequence[tuple[int, str]], *, warmup: int,
            path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A log's steady iterations, in file order: the same iteration with the same time printed by
    several ranks counts once; where the count does not go up a new run starts (a restarted or
    concatenated log) and its own first ``warmup`` iterations are left out too. Each of these,
    and any other record the parser read with a problem, is a note."""
    notes = []
    it = it.sort_values("lineno", kind="stable")
    once = it.drop_duplicates(subset=["iteration", "elapsed_ms"])
    if len(once) < len(it):
        notes.append(f"{path}: {len(it) - len(once)} line(s) repeat an iteration with the same time (several "
                     "ranks print it): counted once")
    run = (once["iteration"].diff().fillna(1) <= 0).cumsum()
    kept = once[once.groupby(run).cumcount() >= warmup]
    starts = once["lineno"][run.diff().fillna(0) > 0].tolist()
    if starts:
        notes.append(f"{path}: the iteration count starts again at line(s) {', '.join(map(str, starts[:5]))}"
                     f"{', …' if len(starts) > 5 else ''} (a restarted or concatenated log): the warm-up ({warmup}) "
                     f"is left out of each of its {len(starts) + 1} runs")
    explained = set(it["lineno"]) - set(once["lineno"][run == 0])  # repeats and later runs: said above
    other = [(n, m) for n, m in warnings if n not in explained]
    if other:
        notes.append(f"{path}: {len(other)} record(s) read with a problem; first, line {other[0][0]}: {other[0][1]}")
    return kept, notes


def check_profile_matches(cfg: TrainConfig, profile_dirs: Sequence[str | Path]) -> None:
    """Refuse a measured profile taken at other shapes than the run's (model dims, dtype, tp, mbs):
    its GEMM table and activation collectives would price different operations."""
    from microbench.runtime.results import iter_run_dirs
    try:
        dirs = iter_run_dirs(profile_dirs)
    except ValueError as e:
        raise CrossCheckError(str(e)) from None
    for d in dirs:
        manifest, _ = read_run(d)
        c = manifest.get("config")
        if not c:
            continue  # a size sweep (collectives): shape-free
        pm, pp_ = c.get("model", {}), c.get("parallel", {})
        pairs = [(f, pm.get(f), getattr(cfg.model, f)) for f in SHAPE_FIELDS]
        pairs += [("tp", pp_.get("tp"), cfg.parallel.tp), ("micro_batch", pp_.get("micro_batch"), cfg.parallel.micro_batch)]
        for name, theirs, ours in pairs:
            if theirs is not None and theirs != ours:
                scale = manifest.get("scale") or _first_scale(d)
                extra = f" (probe --scale {scale})" if scale not in (None, 1, 1.0) else ""
                raise CrossCheckError(f"profile {d} was measured with {name}={theirs}{extra} but the run has "
                                      f"{name}={ours}: measure the profile at the run's shapes, or pass "
                                      "--allow-shape-mismatch to price by interpolation")


def _first_scale(d: Path) -> Any:
    try:
        _, rows = read_run(d)
        return rows[0].get("scale") if rows else None
    except ValueError:
        return None


def compare(measured: MeasuredStep, profile: SystemProfile, *, label: str | None = None) -> Comparison:
    cfg = measured.config
    p = cfg.parallel
    pr = predict(cfg, profile, dp_overlap=measured.dp_overlap)
    label = label or f"tp{p.tp} pp{p.pp} dp{p.dp}"
    cmp = Comparison(label=label, measured=measured, prediction=pr, notes=list(measured.notes))
    spread = measured.spread_s
    if measured.median_s > 0 and spread["stdev"] > 0.1 * measured.median_s:
        cmp.notes.append(f"{label}: measured stdev is {100 * spread['stdev'] / measured.median_s:.0f}% of the "
                         "median; the error is within that noise only as far as it is smaller")
    if measured.timers_s:
        pg = cmp.predicted_groups_s
        worst = max(BREAKDOWN_TIMERS, key=lambda k: abs(pg[k] - measured.timers_s[k]))
        diff = pg[worst] - measured.timers_s[worst]
        if abs(cmp.error_pct) > 10:
            cmp.notes.append(f"{label}: the prediction misses most in {worst}: predicted {pg[worst] * 1e3:.1f} ms vs "
                             f"measured {measured.timers_s[worst] * 1e3:.1f} ms ({diff * 1e3:+.1f} ms, "
                             f"{100 * diff / measured.median_s:+.0f}% of the step)")
            if worst == "compute" and diff < 0:
                # What no probe measures: per-op framework cost (dispatch, autograd, Python)
                # between the kernels. Expressed as the profile knob that would close the gap.
                per_layer = -diff / (cfg.layers_per_stage * p.num_microbatches)
                cmp.notes.append(f"{label}: the compute gap is {per_layer * 1e6:.0f} us per layer per micro-batch "
                                 "(fwd + bwd) beyond the probed kernels and collectives: framework overhead "
                                 "between ops, or TP collectives slower inside the step than in isolation "
                                 "(rank skew); the host probe (microbench.host) measures the first")
    return cmp


def format_table(rows: Sequence[Comparison]) -> str:
    head = (f"{'layout':<16}{'measured ms':>14}{'± stdev':>9}{'[min, max]':>18}{'predicted ms':>14}{'error':>9}")
    lines = [head]
    for c in rows:
        m, s = c.measured, c.measured.spread_s
        rng = f"[{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}]"
        lines.append(f"{c.label:<16}{m.median_s * 1e3:>14.2f}{s['stdev'] * 1e3:>9.2f}{rng:>18}"
                     f"{c.prediction.step_time_s * 1e3:>14.2f}{c.error_pct:>+8.1f}%")
    lines += ["", "breakdown, ms (measured | predicted; measured = timers of the slowest stage):",
              f"{'layout':<16}" + "".join(f"{k:>22}" for k in BREAKDOWN_TIMERS)]
    for c in rows:
        pg = c.predicted_groups_s
        cells = []
        for k in BREAKDOWN_TIMERS:
            meas = f"{c.measured.timers_s[k] * 1e3:.1f}" if c.measured.timers_s else "n/a"
            cell = f"{meas} | {pg[k] * 1e3:.1f}"
            cells.append(f"{cell:>22}")
        lines.append(f"{c.label:<16}" + "".join(cells))
    notes = [n for c in rows for n in c.notes]
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)
