"""A grid of configurations through ``crosscheck megatron``: the real framework at many
sizes, layouts and features, each error with its interval, and the machine's own noise.

The grid file (YAML) names a base, the runs and the configurations; a configuration's keys are
the model and layout flags every command takes (``microbench.harness.modelargs``), without the
dashes' meaning changed::

    base: {model: mds-cpu}           # every configuration starts here
    runs: 3                          # probe/framework pairs per configuration
    iters: 7                         # iterations per framework run, the first ``warmup`` left out
    warmup: 2
    control: small-tp2               # measured twice (first and last): the noise floor
    ci: [small-tp2, small-dp2]       # what .ci/run runs (--only)
    configs:
      - {name: small-tp2, hidden: 256, ffn: 1024, heads: 4, seq: 256, tp: 2}

Per configuration the probes run first at its exact shapes and rank count, then the framework
probe (the narrowed run: the host term), then ``runs`` pairs alternating compute probes and a
framework run; each run is priced by the probes measured just before it. The error is
``median(predicted) / median(measured) − 1``; its 95 % interval a bootstrap over the pairs
(10,000 resamples, seed 0; with 3 pairs only 10 distinct resamples exist, so the interval is
coarse and says so by its width). The control, measured at the start and at the end, gives the
noise floor: the difference of its two errors. A configuration is *beyond noise* when its error
is larger than the floor and its interval excludes zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from microbench.harness.modelargs import ALL_FLAGS, READ, config_from_args
from microbench.model.config import TrainConfig
from microbench.model.vocabulary import PHASES, STEP_COMPONENTS
from microbench.model import yamlfile

from analysis.crosscheck import CrossCheckError
from analysis.crosscheck.probes import probe_flags

RUN_KEYS = ("runs", "iters", "warmup")
TOP_KEYS = ("base", "configs", "control", "ci", *RUN_KEYS)
CONFIG_KEYS = ("name", *ALL_FLAGS, *RUN_KEYS)
BOOTSTRAP = 10_000


@dataclasses.dataclass(frozen=True)
class GridConfig:
    name: str
    cfg: TrainConfig
    runs: int
    iters: int
    warmup: int
    spec: dict[str, Any]
    """The entry as written (base merged), for the CSV."""


@dataclasses.dataclass(frozen=True)
class Grid:
    path: Path
    sha256: str
    configs: tuple[GridConfig, ...]
    control: str | None
    ci: tuple[str, ...]

    def order(self, only: Sequence[str] | None = None, *, repeat_control: bool = True) -> list[tuple[str, GridConfig]]:
        """(label, config) in running order: the control first and again last (label
        ``NAME#2``); ``only`` keeps those names (the control is measured twice only when kept
        and ``repeat_control``)."""
        keep = [c for c in self.configs if only is None or c.name in only]
        ctrl = next((c for c in keep if c.name == self.control), None) if repeat_control else None
        rest = [c for c in keep if c is not ctrl]
        return ([(ctrl.name, ctrl)] if ctrl else []) + [(c.name, c) for c in rest] + \
            ([(f"{ctrl.name}#2", ctrl)] if ctrl else [])


def _where(path: Path, i: int, name: Any) -> str:
    return f"{path}: configs[{i}]" + (f" ({name})" if name else "")


def _positive(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CrossCheckError(f"{what}: {value!r} is not an integer ≥ {minimum}")
    return value


_FLAG_TYPES = {"model": str, "dtype": str, "recompute": str, "gated": bool, "sequence-parallel": bool}
"""A grid entry's flag and the type its value must have (every other flag: an integer)."""
_TYPE_WORDS = {str: "a string", bool: "true or false", int: "an integer"}


def _config(entry: dict[str, Any], *, where: str) -> TrainConfig:
    """The entry's configuration, through the same flag handling every command uses."""
    ns = argparse.Namespace(**{k.replace("-", "_"): None for k in ALL_FLAGS})
    setattr(ns, READ, ALL_FLAGS)
    for key, value in entry.items():
        if key in ALL_FLAGS:
            want = _FLAG_TYPES.get(key, int)
            if value is not None and (not isinstance(value, want) or want is int and isinstance(value, bool)):
                # YAML reads `true`, `1e9` (no dot: a string) and `2.5` as they are; a flag's
                # command-line type is what each must be, as argparse would have made it
                raise CrossCheckError(f"{where}: {key}: {value!r} is not {_TYPE_WORDS[want]}")
            setattr(ns, key.replace("-", "_"), value)
    try:
        return config_from_args(ns, layout="preset")
    except ValueError as e:
        raise CrossCheckError(f"{where}: {e}") from None


def read_grid(path: str | Path) -> Grid:
    """The grid file, every configuration built and checked (framework-runnable, statable to the
    probes) before anything runs; CrossCheckError names the file, the entry and the key."""
    from full_model.megatron.run import refuse_unrunnable
    from full_model.megatron.setup import SetupError
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = yamlfile.load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise CrossCheckError(f"{p}: cannot read the grid: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        line, problem = yamlfile.error_where(e)
        raise CrossCheckError(f"{p}{f':{line}' if line else ''}: cannot read the grid: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("configs"), list) or not data["configs"]:
        raise CrossCheckError(f"{p}: a grid is a mapping with a non-empty list 'configs'")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise CrossCheckError(f"{p}: unknown key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    base = data.get("base") or {}
    top = {k: _positive(data.get(k, d), f"{p}: {k}", 0 if k == "warmup" else 1)
           for k, d in (("runs", 3), ("iters", 7), ("warmup", 2))}
    configs: list[GridConfig] = []
    for i, raw in enumerate(data["configs"]):
        if not isinstance(raw, dict):
            raise CrossCheckError(f"{_where(p, i, None)}: an entry is a mapping of flags")
        entry = {**base, **raw}
        where = _where(p, i, entry.get("name"))
        bad = sorted(set(entry) - set(CONFIG_KEYS))
        if bad:
            raise CrossCheckError(f"{where}: unknown key {bad[0]!r}; known: {', '.join(CONFIG_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "#" in name or name in {c.name for c in configs}:
            raise CrossCheckError(f"{where}: 'name' must be a unique non-empty string without '#'")
        runs = {k: _positive(entry.get(k, top[k]), f"{where}: {k}", 0 if k == "warmup" else 1) for k in RUN_KEYS}
        if runs["iters"] <= runs["warmup"]:
            raise CrossCheckError(f"{where}: iters {runs['iters']} must exceed warmup {runs['warmup']}")
        cfg = _config(entry, where=where)
        try:
            refuse_unrunnable(cfg)
            probe_flags(cfg)
        except (SetupError, CrossCheckError) as e:
            raise CrossCheckError(f"{where}: {e}") from None
        configs.append(GridConfig(name, cfg, spec=entry, **runs))
    names = {c.name for c in configs}
    control = data.get("control")
    ci = tuple(data.get("ci") or ())
    for what, value in [("control", control)] * (control is not None) + [("ci", n) for n in ci]:
        if value not in names:
            raise CrossCheckError(f"{p}: {what} {value!r} is not a configuration of the grid")
    return Grid(p, hashlib.sha256(text.encode()).hexdigest(), tuple(configs), control, ci)


# ---------------------------------------------------------------------------------------------
# Statistics

def error_pct(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return 100.0 * (float(np.median(predicted)) / float(np.median(measured)) - 1.0)


def bootstrap_interval(predicted: Sequence[float], measured: Sequence[float], *, n: int = BOOTSTRAP,
                       seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of :func:`error_pct`, resampling the (prediction, run) pairs."""
    pr, me = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if pr.shape != me.shape or pr.size == 0:
        raise ValueError(f"pairs: {pr.size} predictions for {me.size} runs")
    idx = np.random.default_rng(seed).integers(0, pr.size, size=(n, pr.size))
    errs = 100.0 * (np.median(pr[idx], axis=1) / np.median(me[idx], axis=1) - 1.0)
    lo, hi = np.percentile(errs, [2.5, 97.5])
    return float(lo), float(hi)


def noise_floor_pct(rows: Sequence[dict[str, Any]], control: str | None) -> float | None:
    """|error of the control's first measurement − its second's|, points; None without both."""
    a = next((r for r in rows if r["config"] == control and r["status"] == "ok"), None)
    b = next((r for r in rows if r["config"] == f"{control}#2" and r["status"] == "ok"), None)
    return abs(a["error_pct"] - b["error_pct"]) if a and b else None


def beyond_noise(row: dict[str, Any], floor: float | None) -> bool | None:
    """Error larger than the floor and its interval excluding zero; None without a floor."""
    if floor is None or row["status"] != "ok":
        return None
    return abs(row["error_pct"]) > floor and not row["error_lo_pct"] <= 0.0 <= row["error_hi_pct"]


def summary(rows: Sequence[dict[str, Any]], floor: float | None) -> dict[str, Any]:
    """Over the configurations measured ok (the control's repeat left out): MAPE of the median
    errors, the largest, the count beyond noise."""
    ok = [r for r in rows if r["status"] == "ok" and "#" not in r["config"]]
    errs = [abs(r["error_pct"]) for r in ok]
    return {"configs": len(ok), "failed": sum(r["status"] != "ok" for r in rows),
            "mape_pct": float(np.mean(errs)) if errs else None, "max_abs_error_pct": max(errs) if errs else None,
            "noise_floor_pct": floor, "beyond_noise": [r["config"] for r in ok if r.get("beyond_noise")]}


# ---------------------------------------------------------------------------------------------
# Rows

SHAPE_COLUMNS = ("layers", "hidden", "ffn", "heads", "seq", "mbs", "gbs", "microbatches", "recompute",
                 "sequence_parallel", "zero", "ranks")


def shape_fields(cfg: TrainConfig) -> dict[str, Any]:
    m, p = cfg.model, cfg.parallel
    return {"layers": m.num_layers, "hidden": m.hidden, "ffn": m.ffn_hidden, "heads": m.num_heads,
            "seq": m.seq_len, "mbs": p.micro_batch, "gbs": p.global_batch, "microbatches": p.num_microbatches,
            "recompute": p.recompute, "sequence_parallel": p.sequence_parallel, "zero": p.zero_stage,
            "ranks": p.world_size}


def layout_text(cfg: TrainConfig) -> str:
    p = cfg.parallel
    return "".join(f"{k}{v}" for k, v in (("tp", p.tp), ("pp", p.pp), ("dp", p.dp)) if v > 1) or "tp1"


def median_components(fr: Any) -> dict[str, float]:
    """The components of the median prediction, so that they add up to ``predicted_ms``: the
    median run's, or with an even number of runs the mean of the two middle runs'."""
    runs = fr.predicted_breakdowns_s or [fr.comparison.prediction.breakdown_s]
    order = sorted(range(len(runs)), key=lambda i: sum(runs[i].values()))  # a step is its components' sum
    mid = [order[(len(runs) - 1) // 2], order[len(runs) // 2]]
    return {k: sum(runs[i].get(k, 0.0) for i in mid) / 2 for k in STEP_COMPONENTS}


def result_row(label: str, gc: GridConfig, fr: Any) -> dict[str, Any]:
    """One configuration's CSV row from its :class:`~analysis.crosscheck.megatron.FrameworkRow`."""
    c = fr.comparison
    pred, meas = list(fr.predicted_runs_s), list(c.measured.step_times_s)
    lo, hi = bootstrap_interval(pred, meas)
    phases = getattr(c.prediction, "phases", None) or {}
    row: dict[str, Any] = {
        "config": label, "layout": layout_text(gc.cfg), **shape_fields(gc.cfg), "pairs": len(meas),
        "measured_ms": 1e3 * float(np.median(meas)), "measured_min_ms": 1e3 * min(meas),
        "measured_max_ms": 1e3 * max(meas), "predicted_ms": 1e3 * float(np.median(pred)),
        "predicted_min_ms": 1e3 * min(pred), "predicted_max_ms": 1e3 * max(pred),
        "error_pct": error_pct(pred, meas), "error_lo_pct": lo, "error_hi_pct": hi, "beyond_noise": None,
        "framework_ms": 1e3 * fr.framework.step_s(gc.cfg), "without_framework_ms": 1e3 * fr.without_framework_s,
        "host_sharing": "; ".join(n for n in getattr(c.prediction, "notes", []) if n.startswith("host sharing")),
        **{f"bound_{ph}": (phases.get(ph) or {}).get("bound", "") for ph in PHASES if ph != "step"},
        **{f"c_{k}_ms": 1e3 * v for k, v in median_components(fr).items()},
        "measured_runs_ms": ";".join(f"{1e3 * x:.1f}" for x in meas),
        "predicted_runs_ms": ";".join(f"{1e3 * x:.1f}" for x in pred),
        "status": "ok", "reason": "", "run_dirs": ";".join(fr.run_dirs)}
    if not all(math.isfinite(v) for v in (row["error_pct"], lo, hi)):
        raise CrossCheckError(f"{label}: a non-finite error ({row['error_pct']}, [{lo}, {hi}]): NaN is wrong")
    return row


def failed_row(label: str, gc: GridConfig, reason: str) -> dict[str, Any]:
    return {"config": label, "layout": layout_text(gc.cfg), **shape_fields(gc.cfg), "status": "failed",
            "reason": reason}
