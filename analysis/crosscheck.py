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
``megatron`` does the same against the real Megatron-DeepSpeed (:mod:`analysis.crosscheck_megatron`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from microbench.cli import ArgumentParser
from microbench.config import ModelConfig, ParallelConfig, TrainConfig, preset, with_layout
from microbench.results import read_run

from .predict import Prediction, add_config_args, config_from_args, predict
from .manifest import config_from_manifest
from .profile import SystemProfile, load_profile

BREAKDOWN = ("compute", "p2p_wait", "dp_sync", "optimizer")
# Predictor component → measured timer group (anything not listed runs inside forward/backward).
COMPONENT_GROUP = {"pp_p2p": "p2p_wait", "bubble": "p2p_wait", "dp_sync": "dp_sync", "optimizer": "optimizer"}
# Megatron-LM timer names (``--timing-log-level``) → measured timer group.
MEGATRON_TIMERS = {"forward-compute": "compute", "backward-compute": "compute",
                   "forward-recv": "p2p_wait", "forward-send": "p2p_wait", "backward-recv": "p2p_wait",
                   "backward-send": "p2p_wait", "forward-send-backward-recv": "p2p_wait",
                   "backward-send-forward-recv": "p2p_wait", "all-grads-sync": "dp_sync",
                   "backward-params-all-reduce": "dp_sync", "params-all-gather": "dp_sync",
                   "optimizer": "optimizer"}
SHAPE_FIELDS = ("num_layers", "hidden", "num_heads", "num_kv_heads", "ffn_hidden", "gated_mlp",
                "seq_len", "vocab_size", "dtype")
PROBES = ("gemm", "attention", "layer_ops")
DEFAULT_LAYOUTS = "tp2,pp2,dp2"


class CrossCheckError(ValueError):
    """Bad input (a configuration mismatch, an unreadable run): one line, exit code 2."""


@dataclass
class Measured:
    config: TrainConfig
    step_times_s: list[float]
    """Iterations after the warm-up (the ones the statistic is over)."""
    source: str
    warmup: int
    timers_s: dict[str, float] | None = None
    """Measured breakdown by BREAKDOWN group, or None where the run has no timers."""
    dp_overlap: bool = True
    """Whether the run overlaps the DP gradient sync with the backward (the reference step does not)."""

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
    measured: Measured
    prediction: Prediction
    notes: list[str] = field(default_factory=list)

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.prediction.step_time_s - self.measured.median_s) / self.measured.median_s

    @property
    def predicted_groups_s(self) -> dict[str, float]:
        out = dict.fromkeys(BREAKDOWN, 0.0)
        for k, v in self.prediction.breakdown_s.items():
            out[COMPONENT_GROUP.get(k, "compute")] += v
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


def measured_from_run(run_dir: str | Path) -> Measured:
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
    timers = s.get("timers_us_bottleneck") or s.get("timers_us")
    groups = None
    if timers:
        groups = {"compute": (timers.get("forward", 0) + timers.get("backward", 0)) / 1e6,
                  "p2p_wait": timers.get("p2p_wait", 0) / 1e6, "dp_sync": timers.get("dp_sync", 0) / 1e6,
                  "optimizer": timers.get("optimizer", 0) / 1e6}
    return Measured(config=cfg, step_times_s=[t / 1e6 for t in s["time_us_samples"]], source=str(run_dir),
                    warmup=int(s.get("warmup", 0)), timers_s=groups,
                    dp_overlap=bool(manifest.get("dp_overlap", True)))


def measured_from_log(path: str | Path, cfg: TrainConfig, *, warmup: int = 1) -> Measured:
    """A Megatron-DeepSpeed log, checked against the stated configuration."""
    from full_model.logparse import parse_log
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
    if len(it) <= warmup:
        raise CrossCheckError(f"{path}: {len(it)} iteration(s), all inside the warm-up ({warmup}); "
                              "lower --warmup-steps or give a longer log")
    kept = it.sort_values("iteration").iloc[warmup:]
    groups = None
    t = res.timers
    if len(t):
        t = t[t["name"].isin(MEGATRON_TIMERS)]
        if len(t):
            groups = dict.fromkeys(BREAKDOWN, 0.0)
            for name, grp in t.groupby("name"):
                groups[MEGATRON_TIMERS[name]] += float(grp["time_ms"].median()) / 1e3
    return Measured(config=cfg, step_times_s=[float(x) / 1e3 for x in kept["elapsed_ms"]], source=str(path),
                    warmup=warmup, timers_s=groups)


def check_profile_matches(cfg: TrainConfig, profile_dirs: Sequence[str | Path]) -> None:
    """Refuse a measured profile taken at other shapes than the run's (model dims, dtype, tp, mbs):
    its GEMM table and activation collectives would price different operations."""
    from microbench.results import iter_run_dirs
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


def compare(measured: Measured, profile: SystemProfile, *, label: str | None = None) -> Comparison:
    cfg = measured.config
    p = cfg.parallel
    pr = predict(cfg, profile, dp_overlap=measured.dp_overlap)
    label = label or f"tp{p.tp} pp{p.pp} dp{p.dp}"
    cmp = Comparison(label=label, measured=measured, prediction=pr)
    spread = measured.spread_s
    if measured.median_s > 0 and spread["stdev"] > 0.1 * measured.median_s:
        cmp.notes.append(f"{label}: measured stdev is {100 * spread['stdev'] / measured.median_s:.0f}% of the "
                         "median; the error is within that noise only as far as it is smaller")
    if measured.timers_s:
        pg = cmp.predicted_groups_s
        worst = max(BREAKDOWN, key=lambda k: abs(pg[k] - measured.timers_s[k]))
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
                                 "(rank skew); no probe measures either (spec knob efficiency.layer_overhead_us)")
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
              f"{'layout':<16}" + "".join(f"{k:>22}" for k in BREAKDOWN)]
    for c in rows:
        pg = c.predicted_groups_s
        cells = []
        for k in BREAKDOWN:
            meas = f"{c.measured.timers_s[k] * 1e3:.1f}" if c.measured.timers_s else "n/a"
            cell = f"{meas} | {pg[k] * 1e3:.1f}"
            cells.append(f"{cell:>22}")
        lines.append(f"{c.label:<16}" + "".join(cells))
    notes = [n for c in rows for n in c.notes]
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The local end-to-end loop


def parse_layout(text: str) -> dict[str, int]:
    """'tp2' → {tp: 2}; 'tp2pp2' or 'tp2xpp2' → {tp: 2, pp: 2}."""
    parts = re.findall(r"(tp|pp|dp)(\d+)", text)
    if not parts or re.sub(r"(tp|pp|dp)\d+|[x×_-]", "", text):
        raise CrossCheckError(f"--layouts: {text!r} is not a layout like tp2, pp2, dp2 or tp2pp2")
    return {k: int(v) for k, v in parts}


def _run(cmd: list[str], *, timeout: float, log: Path) -> None:
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n# {time.monotonic() - t0:.1f} s, exit {res.returncode}\n"
                   f"{res.stdout}\n--- stderr ---\n{res.stderr}")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise CrossCheckError(f"{' '.join(cmd[2:5])} failed (exit {res.returncode}): {tail}; log {log}")


def available_probes() -> tuple[list[str], list[str]]:
    import importlib.util
    wanted = [*PROBES, "allreduce", "reduce_scatter", "allgather", "sendrecv"]
    have = [p for p in wanted if importlib.util.find_spec(f"microbench.{p}") is not None]
    return have, [p for p in wanted if p not in have]


def measure_probes(text: str, layout: list[str], *, tp: int, pp: int, dp: int, out: Path,
                   done: dict[tuple, list[Path]], have: list[str], timeout: float,
                   compute_iters: tuple[int, int] | None = None, compute_only: bool = False) -> list[Path]:
    """The probes at a run's exact shapes and rank count (so the cores are as busy as in the
    step); ``done`` caches run directories across layouts that share shapes. ``layout`` is
    the probes' --model/--tp/--pp/--dp flags. ``compute_iters`` = (iterations, warm-up) of
    the compute probes (default: theirs); ``compute_only``: the compute probes alone."""
    world = tp * pp * dp
    dirs: list[Path] = []
    if compute_only:
        have = [p for p in have if p in PROBES]
    its = ["-n", str(compute_iters[0]), "-w", str(compute_iters[1])] if compute_iters else []
    for probe in (p for p in PROBES if p in have):
        key = (probe, tp, world)  # compute shapes depend on tp; contention on the rank count
        if key not in done:
            d = out / "probes" / f"{probe}-tp{tp}-w{world}"
            _run([sys.executable, "-m", f"microbench.{probe}", *layout, *its, "--ranks", str(world), "--quiet",
                  "--out", str(d)], timeout=timeout, log=d.with_suffix(".log"))
            done[key] = [d]
        dirs += done[key]
    for coll in ("allreduce",) if "allreduce" in have else ():
        key = (coll, world)  # a size sweep over the world: TP activations and DP buckets alike
        if key not in done and world > 1:
            d = out / "probes" / f"{coll}-w{world}"
            # many iterations: the profile prices by the mean, and a small collective's
            # latency on a shared host is heavy-tailed (the mean of 20 samples wanders)
            _run([sys.executable, "-m", f"microbench.{coll}", "-b", "4K", "-e", "16M", "-f", "4", "-n", "100",
                  "-w", "10", "--ranks", str(world), "--quiet", "--out", str(d)],
                 timeout=timeout, log=d.with_suffix(".log"))
            done[key] = [d]
        dirs += done.get(key, [])
    if pp > 1 and "sendrecv" in have:  # the pipeline activation/gradient at the step's shape
        key = ("sendrecv", tp, pp, dp)
        if key not in done:
            d = out / "probes" / f"sendrecv-{text}"
            _run([sys.executable, "-m", "microbench.sendrecv", *layout, "--ranks", str(world), "--quiet", "--out", str(d)],
                 timeout=timeout, log=d.with_suffix(".log"))
            done[key] = [d]
        dirs += done[key]
    return dirs


def require_system(cmd: str, system: str | None) -> None:
    """Before any run: what no probe measures is specified by a named spec, never invented."""
    if system is None:
        raise CrossCheckError(f"{cmd}: give --system NAME, the spec that prices what the probes do not "
                              "measure (the network between nodes, device memory, overlap)")


def run_local(layouts: Sequence[str], *, model: str, steps: int, warmup: int, out: Path,
              system: str | None, timeout: float = 300) -> tuple[list[Comparison], list[str]]:
    from .load import load
    from .profile import MeasuredProfile, SpecProfile
    require_system("local", system)
    py = sys.executable
    have, missing = available_probes()
    notes = []
    if missing:
        notes.append(f"probe module(s) not in this tree: {', '.join(missing)}; their operations are priced "
                     f"from the {system} spec")
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, list[Path]] = {}
    comparisons = []
    for text in layouts:
        lay = parse_layout(text)
        tp, pp, dp = lay.get("tp", 1), lay.get("pp", 1), lay.get("dp", 1)
        world = tp * pp * dp
        base = preset(model)
        gbs = base.parallel.global_batch  # the same global batch on every layout
        with_layout(base, tp=tp, pp=pp, dp=dp, global_batch=gbs)  # refuse a bad layout before any run
        layout = ["--model", model, "--tp", str(tp), "--pp", str(pp), "--dp", str(dp)]
        print(f"# {text}: probes and reference step on {world} rank(s)", file=sys.stderr, flush=True)
        dirs = measure_probes(text, layout, tp=tp, pp=pp, dp=dp, out=out, done=done, have=have,
                              timeout=timeout)
        run_dir = out / f"train-{text}"
        _run([py, "-m", "full_model.train", *layout, "--gbs", str(gbs), "--steps", str(steps),
              "--warmup-steps", str(warmup), "--ranks", str(world), "--quiet", "--out", str(run_dir)],
             timeout=timeout, log=run_dir.with_suffix(".log"))
        fallback = SpecProfile.from_yaml(system) if system else None
        profile = MeasuredProfile.from_rows(load(dirs), fallback=fallback, name=f"measured-local-{text}")
        measured = measured_from_run(run_dir)
        comparisons.append(compare(measured, profile, label=text))
    return comparisons, notes


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.crosscheck", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one measured run (run directory or Megatron log) vs its prediction")
    c.add_argument("measured", help="full_model.train run directory, or a Megatron-DeepSpeed log file")
    add_config_args(c)
    c.add_argument("--warmup-steps", type=int, default=1, help="log iterations left out (logs only)")
    c.add_argument("--allow-shape-mismatch", action="store_true",
                   help="accept a measured profile taken at other shapes than the run's")
    c.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    loc = sub.add_parser("local", help="probes → profile → prediction → reference step → table, per layout")
    loc.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated (default {DEFAULT_LAYOUTS})")
    loc.add_argument("--model", default="tiny", help="preset")
    loc.add_argument("--steps", type=int, default=6, help="reference-step iterations per layout")
    loc.add_argument("--warmup-steps", type=int, default=1)
    loc.add_argument("--system", default=None, help="fallback spec for what no probe measured")
    loc.add_argument("--out", default=None, help="where probe and training runs go (default results/crosscheck-<time>)")
    loc.add_argument("--json", action="store_true", help="also print one JSON line per layout")
    from .crosscheck_megatron import add_args as add_megatron_args, main_megatron
    add_megatron_args(sub)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "megatron":
            return main_megatron(a)
        if a.cmd == "local":
            out = Path(a.out or f"results/crosscheck-{time.strftime('%Y%m%d-%H%M%S')}")
            if a.steps <= a.warmup_steps:
                raise CrossCheckError(f"--steps {a.steps} must exceed --warmup-steps {a.warmup_steps}")
            rows, notes = run_local([s for s in a.layouts.split(",") if s], model=a.model, steps=a.steps,
                                    warmup=a.warmup_steps, out=out, system=a.system)
            print(format_table(rows))
            for n in notes:
                print(f"note: {n}")
            print(f"# runs: {out}")
            if a.json:
                for r in rows:
                    print(json.dumps(r.to_dict()))
            return 0
        path = Path(a.measured)
        if path.is_dir():
            measured = measured_from_run(path)
            stated = [f for f in ("model", "tp", "pp", "dp", "mbs", "gbs") if getattr(a, f) is not None]
            if stated:
                given = config_from_args(a)
                if (given.model, given.parallel) != (measured.config.model, measured.config.parallel):
                    raise CrossCheckError(f"{path}: the run's manifest config differs from the one stated on the "
                                          f"command line ({', '.join('--' + f for f in stated)}); drop the flags "
                                          "to use the manifest's")
        elif path.is_file():
            if a.model is None and a.layers is None:
                raise CrossCheckError(f"{path}: a log does not carry its configuration; state it with --model "
                                      "PRESET (or dims) and --tp --pp --dp --mbs --gbs")
            measured = measured_from_log(path, config_from_args(a), warmup=a.warmup_steps)
        else:
            raise CrossCheckError(f"{path}: no such run directory or log file")
        if a.profile and not a.allow_shape_mismatch:
            check_profile_matches(measured.config, a.profile)
        profile = load_profile(system=a.system, profile_dirs=a.profile)
        cmp = compare(measured, profile)
        print(json.dumps(cmp.to_dict()) if a.json else format_table([cmp]))
        return 0
    except (CrossCheckError, ValueError, FileNotFoundError) as e:
        print(f"error: analysis.crosscheck: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
