"""``crosscheck local``: the whole loop on this machine against the project's reference step —
probes at the step's exact shapes, a measured profile, the prediction, the step, the table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from microbench.model.config import preset, with_layout

from analysis.crosscheck import Comparison, CrossCheckError, compare, measured_from_run
from analysis.crosscheck.probes import run_command, measure_probes, parse_layout, require_system

DEFAULT_LAYOUTS = "tp2,pp2,dp2"


def run_local(layouts: Sequence[str], *, model: str, steps: int, warmup: int, out: Path,
              system: str | None, timeout: float = 300) -> tuple[list[Comparison], list[str]]:
    from analysis.load import load
    from analysis.measured import MeasuredProfile
    from analysis.spec import SpecProfile
    require_system("local", system)
    if not layouts:
        raise CrossCheckError("--layouts: no layout given (e.g. tp2,pp2,dp2)")
    fallback = SpecProfile.from_yaml(system)  # a bad spec is refused before any run
    base = preset(model)
    gbs = base.parallel.global_batch  # the same global batch on every layout
    plans = []
    for text in layouts:  # every layout checked before the first runs
        lay = parse_layout(text)
        tp, pp, dp = lay.get("tp", 1), lay.get("pp", 1), lay.get("dp", 1)
        plans.append((text, tp, pp, dp, with_layout(base, tp=tp, pp=pp, dp=dp, global_batch=gbs)))
    py = sys.executable
    notes = []
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, list[Path]] = {}
    comparisons = []
    for text, tp, pp, dp, cfg in plans:
        world = tp * pp * dp
        layout = ["--model", model, "--tp", str(tp), "--pp", str(pp), "--dp", str(dp)]
        print(f"# {text}: probes and reference step on {world} rank(s)", file=sys.stderr, flush=True)
        dirs = measure_probes(cfg, text=text, out=out, done=done, timeout=timeout)
        run_dir = out / f"train-{text}"
        run_command([py, "-m", "full_model.train", *layout, "--gbs", str(gbs), "--steps", str(steps),
              "--warmup-steps", str(warmup), "--ranks", str(world), "--quiet", "--out", str(run_dir)],
             timeout=timeout, log=run_dir.with_suffix(".log"))
        profile = MeasuredProfile.from_rows(load(dirs), fallback=fallback, name=f"measured-local-{text}")
        measured = measured_from_run(run_dir)
        comparisons.append(compare(measured, profile, label=text))
    return comparisons, notes
