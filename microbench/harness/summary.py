"""The main job's last act: price the target with this run's measurements over the ``--system``
spec (``python -m analysis.predict`` in its own process: microbench never imports analysis) and
print, component by component, how much of the step was measured, extrapolated (from what) and
specified (file and key). The prediction is read through the shared vocabulary's
:class:`~microbench.model.vocabulary.PredictionSummary`, not by picking keys out of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from microbench.model.config import preset
from microbench.model.vocabulary import PROVENANCE_WORDS, PredictionSummary, word_mix

MODULE = "microbench"


def predict_and_summarise(args: argparse.Namespace, run_dir: str) -> int:
    """Price the target with this run's measurements over the --system spec (a subprocess:
    microbench does not import analysis) and print what was measured and what specified."""
    preds = {}
    for name, extra in (("prediction", ["--profile", run_dir]), ("spec", [])):
        cmd = [sys.executable, "-m", "analysis.predict", "--model", args.model,
               "--system", args.system, *extra, "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            print(f"error: {MODULE}: prediction failed ({' '.join(cmd[1:])}): "
                  f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                  file=sys.stderr)
            return 1
        preds[name] = json.loads(res.stdout)
        with open(os.path.join(run_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(preds[name], f, indent=2)
    try:
        pred, spec = (PredictionSummary.from_json(preds[k]) for k in ("prediction", "spec"))
    except ValueError as e:
        print(f"error: {MODULE}: {e}", file=sys.stderr)
        return 1
    print(summary_text(args, pred, run_dir, spec=spec))
    return 0


def summary_text(args: argparse.Namespace, pred: PredictionSummary, run_dir: str, *,
                 spec: PredictionSummary | None = None) -> str:
    """The prediction in a few lines: how much of the step was measured, extrapolated (from
    what) and specified (file and key), component by component."""
    cfg = preset(args.model)
    p = cfg.parallel
    step = pred.step_time_s
    lines = [f"# prediction: {args.model} on {p.world_size} ranks (tp {p.tp} pp {p.pp} dp {p.dp}, "
             f"mbs {p.micro_batch}, gbs {p.global_batch}); system {args.system}"]
    if getattr(args, "scale_why", None):
        lines.append(f"#   compute scale : {args.scale_why}")
    lines.append(f"#   step time     : {step:.4g} s")
    words = pred.seconds_by_provenance
    lines.append("#   of the step   : " + ", ".join(
        f"{w} {words.get(w, 0.0):.3g} s ({words.get(w, 0.0) / step:.0%})" for w in PROVENANCE_WORDS))
    for comp, t in sorted(pred.breakdown_s.items(), key=lambda kv: -kv[1]):
        if t > 0:
            lines += _component_lines(comp, t, pred.provenance_s.get(comp, {}))
    for key in ("peak", "memory", "overlap.tp", "overlap.dp"):
        if key in pred.sources:
            lines.append(f"#   {key:<14}: {pred.sources[key]}")
    for note in pred.notes:
        lines.append(f"#   note          : {note}")
    lines.append(f"#   FOM           : {pred.fom:.4g}  (benchmark definition: (6sd²+s²d)·b·L/T)")
    lines.append(f"#   model TFLOP/s : {pred.model_tflops_per_device:.4g} per device, MFU {100 * pred.mfu:.1f}%")
    seed = pred.seed_model
    if seed:
        lines.append(f"#   benchmark's 2-term model: {seed['step_time_s']:.4g} s "
                     f"(α {seed['alpha']:.3g} s/MAC, β {seed['beta']:.3g} s/element)")
    if spec is not None:
        lines.append(f"#   spec only     : {spec.step_time_s:.4g} s, FOM {spec.fom:.4g}, MFU "
                     f"{100 * spec.mfu:.1f}% — {args.system} as specified, nothing measured here")
    lines.append(f"#   rows: {run_dir}/rows.jsonl  prediction: {run_dir}/prediction.json "
                 f"(spec only: {run_dir}/spec.json)")
    lines.append(f"#   report: python -m analysis.report {run_dir}")
    return "\n".join(lines)


def _component_lines(comp: str, t: float, srcs: dict[str, float]) -> list[str]:
    """One component: its seconds and provenance mix, then its sources that were not measured
    (the first three above 1 % of it; prediction.json's provenance_s has them all)."""
    lines = [f"#   {comp:<14}: {t:.3g} s  {word_mix(srcs)}"]
    if comp == "bubble":
        return lines  # the stage's own sources, listed under its components
    shown = 0
    for src, v in sorted(srcs.items(), key=lambda kv: -kv[1]):
        if src.startswith("measured"):
            continue
        if v / t < 0.01 or shown == 3:
            rest = [x for x in srcs if not x.startswith("measured")][shown:]
            lines.append(f"#       … {len(rest)} more source(s) below 1% each or beyond the first 3 "
                         f"(prediction.json: provenance_s)")
            break
        lines.append(f"#       {v / t:>4.0%} {src}")
        shown += 1
    return lines
