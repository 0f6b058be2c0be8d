"""Cross-check against the real Megatron-DeepSpeed: probes → profile → prediction → framework runs.

    python -m analysis.crosscheck megatron [--source DIR] --layouts tp2,pp2,dp2,tp2pp2 \\
        [--model mds-cpu] [--runs 3] [--iters 8] [--warmup 2] [--json]

Per layout: the probes at the run's exact shapes and rank count (as ``crosscheck local``),
a measured profile from their rows, the *framework probe* (the same framework at the same
layout, layer count and micro-batch count, with the model narrowed to hidden 64 / seq 64;
its step time less the probes' price of the narrowed operations is the framework's own time —
Python layers and autograd between kernels, the pipeline engine's schedule, DeepSpeed's
step — measured, never fitted), the prediction with and without that term, and ``--runs`` runs of
``pretrain_gpt.py`` at full width. Measured step time = median over runs of each run's median
after ``--warmup`` iterations; the spread is the runs' min/max.

Why the narrowed run is the right probe of the framework: its layer count, micro-batch count,
pipeline schedule, ZeRO stage and rank count are the full run's, so every per-layer,
per-micro-batch and per-step framework cost is there once, as in the full run; only the
kernels (which the other probes price) shrink, and what they still cost is taken away at
the probes' price. Assumption, stated: the framework's host time does not grow with the
width (true of Python and dispatch cost; not of copies, which scale with the bytes).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from microbench.harness.cli import user_path
from microbench.model.config import TrainConfig, narrowed, with_layout
from microbench.model.workload import distinct_gemms, workload

from analysis.crosscheck import Comparison, CrossCheckError, MeasuredStep, compare, measured_from_run
from analysis.crosscheck.probes import PROBES, complete, measure_probes, parse_layout, probe_flags, require_system, run_command
from analysis.predict import predict
from analysis.system import SystemProfile, WithHost
from analysis.provenance import extrapolated



@dataclasses.dataclass(frozen=True)
class HostTerm:
    """The framework's host time, measured by its narrowed run (:func:`framework_probe`): the
    host term of the prediction (``microbench.host`` measures the same for the project's own
    layer) — one term, one name. Per layer per micro-batch on the bottleneck stage, split over
    the phases the step runs (on a CPU host and device add, so the split does not move the
    step)."""

    per_layer_microbatch_s: float
    source: str

    def profile(self, base: SystemProfile, cfg: TrainConfig) -> SystemProfile:
        phases = [h.phase for h in workload(cfg).host if h.name == "layer"]
        return WithHost(base, {ph: self.per_layer_microbatch_s / len(phases) for ph in phases}, self.source)

    def step_s(self, cfg: TrainConfig) -> float:
        return self.per_layer_microbatch_s * cfg.layers_per_stage * cfg.parallel.num_microbatches


def without_host(base: SystemProfile) -> SystemProfile:
    """``base`` with no host time: the probes' operations alone (shown beside, for comparison)."""
    return WithHost(base, {}, "specified (nothing: the prediction without host time, for comparison)")


@dataclasses.dataclass
class FrameworkRow:
    """One layout's result: the comparison with the framework's host term, and without it."""
    comparison: Comparison
    without_framework_s: float
    framework: HostTerm
    run_dirs: list[str]
    framework_detail: dict[str, float] = dataclasses.field(default_factory=dict)
    reference_s: float | None = None
    """The project's reference step (full_model.train) at the same configuration, median."""
    predicted_runs_s: list[float] = dataclasses.field(default_factory=list)
    """The prediction next to each framework run (interleaved probes), in run order."""
    predicted_breakdowns_s: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Those predictions' components (seconds by step component), in run order."""


def _run_framework(cfg: TrainConfig, *, source: Path, out: Path, iters: int, timeout: float,
                   reuse: bool = False) -> Path:
    from full_model.megatron.run import RunOptions, run
    if reuse and complete(out):
        return out
    check = run(cfg, RunOptions(source=source, out=out, train_iters=iters, timeout_s=timeout))
    if check.status != "ok":
        raise CrossCheckError(f"Megatron-DeepSpeed run {out} failed: {'; '.join(check.reasons)} "
                              f"(log {out / 'train.log'})")
    return out


def steady_median_s(run_dir: Path, *, warmup: int) -> tuple[float, list[float]]:
    """Median elapsed time of a run's iterations after the warm-up, and those samples (s)."""
    it = pd.read_csv(run_dir / "iterations.csv").sort_values("iteration")
    kept = it[it["iteration"] > warmup]["elapsed_ms"].astype(float) / 1e3
    if kept.empty:
        raise CrossCheckError(f"{run_dir}: no iteration after the {warmup} warm-up iteration(s)")
    return float(kept.median()), kept.tolist()


def narrow_gemm_shapes(narrow: TrainConfig) -> list[str]:
    """The narrowed model's distinct GEMM shapes (layer and LM head, every phase) as
    ``microbench.gemm --shape`` arguments."""
    return sorted({f"{g.m},{g.n},{g.k}" for g in distinct_gemms(narrow)})


def measure_narrow_gemms(cfg: TrainConfig, *, out: Path, timeout: float, compute_iters: tuple[int, int]) -> Path:
    """The framework probe's GEMMs measured at exactly its narrowed shapes on the layout's
    rank count (``microbench.gemm --shape``): a GPU tile model scaled down from the
    full-width GEMMs says nothing of a 64-wide GEMM on a CPU."""
    narrow, p = narrowed(cfg), cfg.parallel
    if not (out / "manifest.json").is_file():
        shapes = [x for s in narrow_gemm_shapes(narrow) for x in ("--shape", s)]
        run_command([sys.executable, "-m", "microbench.gemm", *shapes, "-d", narrow.model.dtype, "--no-peak",
              "-n", str(compute_iters[0]), "-w", str(compute_iters[1]), "--ranks", str(p.tp * p.pp * p.dp),
              "--quiet", "--out", str(out)], timeout=timeout, log=out.with_suffix(".log"))
    return out


def framework_probe(cfg: TrainConfig, dirs: Sequence[Path], *, source: Path, out: Path, iters: int, warmup: int,
                    timeout: float, fallback: Any, reuse: bool = False) -> tuple[HostTerm, dict[str, float]]:
    """Run the framework narrowed to HOST_WIDTH (same layout, layers, micro-batches) and take
    away what the probes price at the narrowed shapes (``dirs``: the layout's probes and
    :func:`measure_narrow_gemms`): GEMMs measured at exactly those shapes, collectives from
    the layout's size sweep, memory-bound ops from its α–β fits. What is left is the
    framework's own time. A negative remainder is clamped to 0 and recorded."""
    from analysis.load import load
    from analysis.measured import MeasuredProfile
    narrow = narrowed(cfg)
    profile = MeasuredProfile.from_rows(load(list(dirs)), fallback=fallback, name=f"measured-narrow-{out.name}")
    d = _run_framework(narrow, source=source, out=out, iters=iters, timeout=timeout, reuse=reuse)
    t, _ = steady_median_s(d, warmup=warmup)
    priced = predict(narrow, without_host(profile), dp_overlap=False).step_time_s
    left = t - priced
    clamp = "" if left >= 0 else f"; clamped from {left * 1e3:.1f} ms to 0"
    per = max(left, 0.0) / (cfg.layers_per_stage * cfg.parallel.num_microbatches)
    m = narrow.model
    # Extrapolated, not measured: the host time is measured at the narrowed width and carried
    # to the priced shape on the assumption that it does not depend on the width.
    src = extrapolated(f"framework run {d}, this layout, {cfg.layers_per_stage} layers/stage × "
                       f"{cfg.parallel.num_microbatches} micro-batches, narrowed to hidden {m.hidden} "
                       f"seq {m.seq_len}: {t * 1e3:.1f} ms, minus the probes' price of its operations "
                       f"({priced * 1e3:.1f} ms); host time taken as width-independent{clamp}")
    return HostTerm(per_layer_microbatch_s=per, source=src), {"narrow_measured_s": t,
                                                                   "narrow_priced_s": priced}


@dataclasses.dataclass
class Planned:
    """One configuration's probes, measured before any framework run: the run directories
    of the probes at its shapes and of its narrowed GEMMs."""
    text: str
    cfg: TrainConfig
    dirs: list[Path]
    narrow: Path


def plan_config(text: str, cfg: TrainConfig, *, out: Path, done: dict[tuple, list[Path]], timeout: float,
                compute_iters: tuple[int, int], reuse: bool = False) -> Planned:
    """The probes for ``cfg`` (its exact shapes and rank count) and its narrowed GEMMs
    (``reuse``: complete run directories under ``out`` are kept, not measured again)."""
    print(f"# {text}: probes on {cfg.parallel.world_size} rank(s)", file=sys.stderr, flush=True)
    dirs = measure_probes(cfg, text=text, out=out, done=done, timeout=timeout, compute_iters=compute_iters,
                          reuse=reuse, adam=FRAMEWORK_ADAM)
    narrow = measure_narrow_gemms(cfg, out=out / "probes" / f"gemm-narrow-{text}", timeout=timeout,
                                  compute_iters=compute_iters)
    return Planned(text, cfg, dirs, narrow)


def _reference(pl: Planned, *, out: Path, iters: int, warmup: int, timeout: float) -> float:
    """The project's own step (``full_model.train``) at the configuration, median seconds."""
    p = pl.cfg.parallel
    ref = out / f"train-{pl.text}"
    zero = ["--zero", str(p.zero_stage)] if p.zero_stage else []
    run_command([sys.executable, "-m", "full_model.train", *probe_flags(pl.cfg), *zero, "--gbs", str(p.global_batch),
                 "--steps", str(iters), "--warmup-steps", str(warmup), "--ranks", str(p.world_size), "--quiet",
                 "--out", str(ref)], timeout=timeout, log=ref.with_suffix(".log"))
    return measured_from_run(ref).median_s


def run_planned(pl: Planned, *, source: Path, runs: int, iters: int, warmup: int, out: Path, fallback: Any,
                timeout: float, with_reference: bool, compute_iters: tuple[int, int], interleave: bool,
                reuse: bool = False) -> FrameworkRow:
    """The framework probe, then ``runs`` pairs of (compute probes, framework run) alternating;
    each run priced by the probes measured just before it (``reuse``: as :func:`plan_config`)."""
    from analysis.load import load
    from analysis.measured import MeasuredProfile
    cfg, text = pl.cfg, pl.text
    print(f"# {text}: framework probe, {runs} Megatron-DeepSpeed run(s) on {cfg.parallel.world_size} rank(s)",
          file=sys.stderr, flush=True)
    profile = MeasuredProfile.from_rows(load(pl.dirs), fallback=fallback, name=f"measured-megatron-{text}")
    reference_s = _reference(pl, out=out, iters=iters, warmup=warmup, timeout=timeout) if with_reference else None
    fw, fw_detail = framework_probe(cfg, [*pl.dirs, pl.narrow], source=source, out=out / f"framework-probe-{text}",
                                    iters=iters, warmup=warmup, timeout=timeout, fallback=fallback, reuse=reuse)
    medians, run_dirs, per_run = [], [], []
    for r in range(runs):
        run_profile = profile
        if interleave:
            # The compute probes again, just before this run: on a shared host the machine's
            # speed drifts by 20 % over minutes (the same GEMM probe gave 315 and 256 ms per
            # layer and micro-batch half an hour apart), so each run is priced by probes
            # measured next to it, and the comparison is of medians over runs.
            fresh = measure_probes(cfg, text=text, out=out / f"run{r}-{text}", done={}, timeout=timeout,
                                   compute_iters=compute_iters, compute_only=True, reuse=reuse,
                                   adam=FRAMEWORK_ADAM)
            kept = [d for d in pl.dirs if d.name.split("-")[0] not in PROBES]
            run_profile = MeasuredProfile.from_rows(load([*kept, *fresh]), fallback=fallback,
                                                    name=f"measured-megatron-{text}-run{r}")
        d = _run_framework(cfg, source=source, out=out / f"megatron-{text}-run{r}", iters=iters, timeout=timeout,
                           reuse=reuse)
        medians.append(steady_median_s(d, warmup=warmup)[0])
        run_dirs.append(str(d))
        # DeepSpeed's engine reduces the gradients after the backward (ZeRO-0; ZeRO-1 without
        # overlap_comm): no overlap with compute
        per_run.append((predict(cfg, fw.profile(run_profile, cfg), dp_overlap=False),
                        predict(cfg, without_host(run_profile), dp_overlap=False).step_time_s, run_profile))
    measured = MeasuredStep(config=cfg, step_times_s=medians, source=", ".join(run_dirs), warmup=warmup,
                            dp_overlap=False)
    # the run whose prediction is the median one (runs ≥ 3 odd: exactly the median)
    order = sorted(range(runs), key=lambda i: per_run[i][0].step_time_s)
    pred, base_s, mid_profile = per_run[order[(runs - 1) // 2]]
    cmp = compare(measured, fw.profile(mid_profile, cfg), label=text)
    cmp.prediction = pred
    return FrameworkRow(comparison=cmp, without_framework_s=base_s, framework=fw, run_dirs=run_dirs,
                        reference_s=reference_s, framework_detail=fw_detail,
                        predicted_runs_s=[x[0].step_time_s for x in per_run],
                        predicted_breakdowns_s=[dict(x[0].breakdown_s) for x in per_run])


FRAMEWORK_ADAM = "torch"
"""The optimizer the launched framework steps: its jobs pass ``--optimizer adam`` by default and
no ``--ds-fused-adam`` (full_model/megatron/jobscript.py), so Megatron-DeepSpeed builds
``torch.optim.Adam`` (megatron/optimizer/__init__.py) and DeepSpeed calls it on each ZeRO
partition; ``microbench.layer_ops --adam torch`` measures that, not the fused AdamW."""

FRAMEWORK_ATTENTION = ("set by the Megatron-DeepSpeed cross-check, whatever the file says: its runs pass no "
                       "--use-flash-attn* flag (full_model/megatron/jobscript.py), so ParallelAttention runs "
                       "CoreAttention, baddbmm, softmax and bmm over the s×s scores (megatron/model/transformer.py)")


def framework_fallback(system: str) -> Any:
    """The spec ``system`` with the attention path the launched framework takes (the explicit
    one): which kernel runs is the framework's choice, and pricing the spec's flash path
    (aurora.yaml's) against runs that never call it under-prices the s×s work."""
    from analysis.spec import SpecProfile
    return SpecProfile.from_yaml(system).with_knobs({"efficiency.attention_fused": False},
                                                    because=FRAMEWORK_ATTENTION)


def layout_config(model: TrainConfig, text: str) -> TrainConfig:
    """``model`` on the layout ``text`` (tp2, pp2, dp2, tp2pp2), its global batch kept."""
    lay = parse_layout(text)
    try:
        return with_layout(model, tp=lay.get("tp", 1), pp=lay.get("pp", 1), dp=lay.get("dp", 1),
                           global_batch=model.parallel.global_batch)
    except ValueError as e:
        raise CrossCheckError(f"--layouts {text}: {e}") from None


def run_megatron(layouts: Sequence[str], *, model: TrainConfig, source: Path, runs: int, iters: int,
                 warmup: int, out: Path, system: str | None, timeout: float = 1800,
                 with_reference: bool = True, compute_iters: tuple[int, int] = (30, 5),
                 interleave: bool = True) -> tuple[list[FrameworkRow], list[str]]:
    require_system("megatron", system)
    if not layouts:
        raise CrossCheckError("--layouts: no layout given (e.g. tp2,pp2,dp2,tp2pp2)")
    fallback = framework_fallback(system)
    cfgs = [(text, layout_config(model, text)) for text in layouts]  # every layout refused or kept up front
    for _, cfg in cfgs:
        probe_flags(cfg)  # a configuration the probes cannot state is refused before any runs
    out.mkdir(parents=True, exist_ok=True)
    # Every layout's probes first, on a machine no framework run has touched yet: a probe
    # started just after a framework run's ranks exit was seen to run 1.5-2x slow for
    # seconds (one transient of that kind doubled two GEMMs' means and the pp2/dp2 price).
    done: dict[tuple, list[Path]] = {}
    plans = [plan_config(text, cfg, out=out, done=done, timeout=timeout, compute_iters=compute_iters)
             for text, cfg in cfgs]
    rows = [run_planned(pl, source=source, runs=runs, iters=iters, warmup=warmup, out=out, fallback=fallback,
                        timeout=timeout, with_reference=with_reference, compute_iters=compute_iters,
                        interleave=interleave) for pl in plans]
    return rows, []


def format_table(rows: Sequence[FrameworkRow]) -> str:
    head = (f"{'layout':<9}{'reference':>10}{'Megatron ms':>12}{'[min, max] over runs':>24}{'probes only':>13}{'+framework':>12}"
            f"{'predicted':>11}{'[min, max] predicted':>24}{'error':>9}")
    lines = ["Megatron-DeepSpeed (real framework) vs prediction", head]
    for r in rows:
        c = r.comparison
        s = c.measured.spread_s
        rng = f"[{s['min'] * 1e3:.0f}, {s['max'] * 1e3:.0f}]"
        fw = r.framework.step_s(c.measured.config)
        ref = f"{r.reference_s * 1e3:.0f}" if r.reference_s is not None else "-"
        pr = r.predicted_runs_s or [c.prediction.step_time_s]
        prng = f"[{min(pr) * 1e3:.0f}, {max(pr) * 1e3:.0f}]"
        lines.append(f"{c.label:<9}{ref:>10}{c.measured.median_s * 1e3:>12.0f}{rng:>24}{r.without_framework_s * 1e3:>13.0f}"
                     f"{fw * 1e3:>12.0f}{c.prediction.step_time_s * 1e3:>11.0f}{prng:>24}{c.error_pct:>+8.1f}%")
    lines += ["", "attribution, ms per step (predicted components; 'framework' = the framework probe):"]
    keys = [k for k in rows[0].comparison.prediction.breakdown_s] if rows else []
    lines.append(f"{'layout':<9}" + "".join(f"{k[:10]:>11}" for k in keys) + f"{'gap':>9}")
    for r in rows:
        c = r.comparison
        gap = c.measured.median_s - r.without_framework_s
        lines.append(f"{c.label:<9}" + "".join(f"{c.prediction.breakdown_s[k] * 1e3:>11.1f}" for k in keys)
                     + f"{gap * 1e3:>9.0f}")
    lines += ["", "reference = the project's own step (full_model.train) at the same configuration, median ms",
              "predicted = the median of the predictions made next to each run (compute probes measured just "
              "before it), with their range",
              "gap = measured − probes-only prediction: what the framework adds beyond the probed operations"]
    return "\n".join(lines)


def json_line(rows: Sequence[FrameworkRow], *, identity: dict[str, str]) -> str:
    out: list[dict[str, Any]] = []
    for r in rows:
        c = r.comparison
        s = c.measured.spread_s
        out.append({"layout": c.label, "predicted_s": c.prediction.step_time_s, "measured_s": c.measured.median_s,
                    "measured_min_s": s["min"], "measured_max_s": s["max"], "error_pct": c.error_pct,
                    "predicted_without_framework_s": r.without_framework_s,
                    "framework_per_layer_microbatch_s": r.framework.per_layer_microbatch_s,
                    "framework_source": r.framework.source, **r.framework_detail, "runs_s": c.measured.step_times_s,
                    "predicted_runs_s": r.predicted_runs_s,
                    "reference_step_s": r.reference_s, "components": c.prediction.breakdown_s})
    return json.dumps({"megatron_commit": identity["commit"], "megatron_commit_source": identity["commit_source"],
                       "layouts": out})


def model_from_args(a: Any) -> TrainConfig:
    from microbench.harness.modelargs import config_from_args
    return config_from_args(a, layout="preset")


def add_args(sub: Any) -> None:
    from microbench.harness.modelargs import add_model_args
    g = sub.add_parser("megatron", help="probes → profile → prediction → the real Megatron-DeepSpeed, per layout")
    g.add_argument("--source", type=user_path, help="Megatron-DeepSpeed checkout (default $MEGATRON_DEEPSPEED, else the vendored "
                                    "archive in ../shared/vendor, unpacked into the cache)")
    g.add_argument("--layouts", default="tp2,pp2,dp2,tp2pp2", help="comma-separated")
    add_model_args(g, flags=("model", "layers", "hidden", "ffn", "seq", "dtype", "mbs", "gbs"), layout="preset",
                   model="mds-cpu", model_help="preset (its shapes are what the probes measure; default mds-cpu)")
    g.add_argument("--runs", type=int, default=3, help="full-width framework runs per layout")
    g.add_argument("--iters", type=int, default=8, help="iterations per framework run")
    g.add_argument("--warmup", type=int, default=2, help="iterations left out of each run's median")
    g.add_argument("--probe-iters", type=int, default=30,
                   help="iterations of each compute probe case (the profile prices by their mean)")
    g.add_argument("--probe-warmup", type=int, default=5, help="warm-up iterations of each compute probe case")
    g.add_argument("--no-interleave", action="store_true",
                   help="price every run from the probes measured once up front (default: the compute "
                        "probes again just before each framework run, and medians compared)")
    g.add_argument("--system", default=None, help="fallback spec for what no probe measured")
    g.add_argument("--out", type=user_path, default=None, help="where everything goes (default results/crosscheck-megatron-<time>)")
    g.add_argument("--timeout-s", type=float, default=1800.0, help="limit of each framework run and probe")
    g.add_argument("--no-reference", action="store_true", help="skip the project's reference step")
    g.add_argument("--json", action="store_true", help="end with one JSON line")


def main_megatron(a: Any) -> int:
    from full_model.megatron.setup import SetupError, framework_identity, resolve_source
    from microbench.runtime.results import default_out_dir
    if a.runs < 1 or a.iters <= a.warmup or a.warmup < 0:
        raise CrossCheckError(f"--runs {a.runs} --iters {a.iters} --warmup {a.warmup}: need runs ≥ 1 and "
                              "0 ≤ warmup < iters")
    if a.probe_iters < 1 or a.probe_warmup < 0:
        raise CrossCheckError(f"--probe-iters {a.probe_iters} --probe-warmup {a.probe_warmup}: need ≥ 1 and ≥ 0")
    if not 0 < a.timeout_s < float("inf"):
        raise CrossCheckError(f"--timeout-s {a.timeout_s}: need a finite number of seconds > 0")
    if any(getattr(a, f) is not None for f in ("layers", "hidden", "ffn", "seq")):
        raise CrossCheckError("--layers/--hidden/--ffn/--seq: the probes take a preset only; add a preset to "
                              "microbench/model/config.py so probes and framework run the same shapes")
    try:
        source = resolve_source(a.source)
    except SetupError as e:
        raise CrossCheckError(str(e)) from None
    model = model_from_args(a)
    out = a.out or user_path(str(default_out_dir("crosscheck-megatron")))
    rows, notes = run_megatron([s for s in a.layouts.split(",") if s], model=model, source=source, runs=a.runs,
                               iters=a.iters, warmup=a.warmup, out=out, system=a.system, timeout=a.timeout_s,
                               with_reference=not a.no_reference,
                               compute_iters=(a.probe_iters, a.probe_warmup), interleave=not a.no_interleave)
    print(format_table(rows))
    for n in notes + [n for r in rows for n in r.comparison.notes]:
        print(f"note: {n}")
    print(f"# runs: {out}")
    if a.json:
        print(json_line(rows, identity=framework_identity(source)))
    return 0
