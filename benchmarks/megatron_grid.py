"""The grid mode of ``python -m benchmarks.crosscheck_megatron``: every configuration of a grid
file through the cross-check, one CSV row each (written after every configuration, so an
interrupted benchmark keeps what it measured), a machine sidecar, a summary, and the README's
table made from the CSV (``--table``). The grid file's format: :mod:`analysis.crosscheck.grid`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from analysis.crosscheck import CrossCheckError
from analysis.crosscheck.grid import (SHAPE_COLUMNS, Grid, beyond_noise, failed_row, noise_floor_pct, read_grid,
                                      result_row, summary)
from analysis.crosscheck.megatron import framework_fallback, plan_config, run_planned
from analysis.crosscheck.probes import ran_past
from microbench.harness.lifecycle import interrupt_name
from microbench.model.vocabulary import STEP_COMPONENTS

COLUMNS = ("config", "layout", *SHAPE_COLUMNS, "pairs", "measured_ms", "measured_min_ms", "measured_max_ms",
           "predicted_ms", "predicted_min_ms", "predicted_max_ms", "error_pct", "error_lo_pct", "error_hi_pct",
           "beyond_noise", "framework_ms", "without_framework_ms", "host_sharing", "bound_fwd", "bound_recompute", "bound_bwd",
           *(f"c_{k}_ms" for k in STEP_COMPONENTS), "measured_runs_ms", "predicted_runs_ms", "status", "reason",
           "run_dirs")
TARGETS = {"mape_pct": 8.0, "max_abs_error_pct": 15.0, "mds_layout_pct": 10.0}
"""Issue 20's targets: MAPE of the median errors over the grid, the largest, and each mds-cpu
layout (the four configurations of the preset itself)."""


def machine() -> dict[str, Any]:
    """The machine the grid ran on (the CSV's sidecar)."""
    import torch
    import torch.distributed as dist
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"cpu_model": cpu or platform.processor(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gloo": dist.is_gloo_available(),
            "deepspeed": version("deepspeed"), "host": platform.node()}


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The rows in :data:`COLUMNS` order, replacing ``path`` atomically."""
    df = pd.DataFrame(list(rows)).reindex(columns=list(COLUMNS))
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.4g")
    tmp.replace(path)


def _annotate(rows: list[dict[str, Any]], grid: Grid) -> dict[str, Any]:
    floor = noise_floor_pct(rows, grid.control)
    for r in rows:
        r["beyond_noise"] = beyond_noise(r, floor)
    return summary(rows, floor)


def run_grid(grid: Grid, *, only: Sequence[str] | None, source: Path, out: Path, csv: Path, system: str,
             timeout: float, compute_iters: tuple[int, int], command: str,
             repeat_control: bool = True, reuse: bool = False) -> tuple[list[dict[str, Any]], dict]:
    """Every configuration measured and priced, the CSV rewritten after each. ``reuse``: run
    directories under ``out`` that are complete are kept (an interrupted grid resumes; a
    finished one is priced again by this checkout's model without measuring anything)."""
    from full_model.megatron.setup import framework_identity
    from microbench.runtime.results import git_commit
    fallback = framework_fallback(system)
    out.mkdir(parents=True, exist_ok=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    side = {"command": command, "grid": str(grid.path), "grid_sha256": grid.sha256, "system": system,
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "framework": framework_identity(source), "suite_commit": git_commit(), "run_dirs": str(out),
            "reused_complete_runs": reuse, "targets": TARGETS}
    sidecar = csv.with_suffix(".machine.json")
    sidecar.write_text(json.dumps(side, indent=1) + "\n")
    rows: list[dict[str, Any]] = []
    done: dict[tuple, list[Path]] = {}  # collective sweeps shared by configurations on the same world
    t0 = time.monotonic()
    order = grid.order(only, repeat_control=repeat_control)
    for label, gc in order:
        text = label.replace("#", "-")
        print(f"# grid: {label} ({len(rows) + 1}/{len(order)})", file=sys.stderr, flush=True)
        try:
            pl = plan_config(text, gc.cfg, out=out, done=done if "#" not in label else {}, timeout=timeout,
                             compute_iters=compute_iters, reuse=reuse)
            fr = run_planned(pl, source=source, runs=gc.runs, iters=gc.iters, warmup=gc.warmup, out=out,
                             fallback=fallback, timeout=timeout, with_reference=False,
                             compute_iters=compute_iters, interleave=True, reuse=reuse)
            rows.append(result_row(label, gc, fr))
        except (CrossCheckError, subprocess.TimeoutExpired) as e:
            why = ran_past(e) if isinstance(e, subprocess.TimeoutExpired) else str(e)
            rows.append(failed_row(label, gc, why))
            print(f"error: {label}: {why}", file=sys.stderr, flush=True)
        except KeyboardInterrupt as e:  # the CSV keeps every finished configuration; the sidecar says where it stopped
            side.update(interrupted={"signal": interrupt_name(e), "during": label, "completed": len(rows),
                                     "of": len(order)},
                        finished=_dt.datetime.now().isoformat(timespec="seconds"), wall_s=round(time.monotonic() - t0))
            side["summary"] = _annotate(rows, grid)
            write_csv(rows, csv)
            sidecar.write_text(json.dumps(side, indent=1) + "\n")
            raise
        side["summary"] = _annotate(rows, grid)
        write_csv(rows, csv)
    side.update(finished=_dt.datetime.now().isoformat(timespec="seconds"), wall_s=round(time.monotonic() - t0))
    side["summary"] = _annotate(rows, grid)
    side["mds_layouts"] = mds_layouts(rows)
    write_csv(rows, csv)
    sidecar.write_text(json.dumps(side, indent=1) + "\n")
    return rows, side


def mds_layouts(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The error of each configuration that is the mds-cpu preset itself on a layout (``mds-*``)."""
    return {r["config"]: r["error_pct"] for r in rows
            if r["status"] == "ok" and r["config"].startswith("mds-") and "#" not in r["config"]}


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def markdown_table(csv: Path) -> str:
    """The README's table from a grid CSV (and its sidecar's noise floor and summary); a file
    that is not one of this benchmark's grid CSVs is refused naming what it lacks."""
    try:
        df = pd.read_csv(csv)
    except (OSError, ValueError) as e:  # no file, empty, not CSV (pandas' errors are ValueErrors)
        raise CrossCheckError(f"--table {csv}: {e}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise CrossCheckError(f"--table {csv}: not a grid CSV of this benchmark (no column {missing[0]!r}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})")
    side_path = csv.with_suffix(".machine.json")
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    lines = ["| config | layout | hidden × layers, seq, mbs × micro-batches | features | measured ms [min, max] "
             "| predicted ms | error % [95 % interval] | beyond noise |", "|---|---|---|---|---|---|---|---|"]
    for r in df.to_dict("records"):
        feats = ", ".join(f for f, on in (("full recompute", r["recompute"] == "full"),
                                          ("SP", bool(r["sequence_parallel"])), (f"ZeRO-{r['zero']}", r["zero"] > 0))
                          if on) or "-"
        shape = f"{r['hidden']} × {r['layers']}, {r['seq']}, {r['mbs']} × {r['microbatches']}"
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['layout']} | {shape} | {feats} | failed: {r['reason']} | | | |")
            continue
        bn = {True: "yes", False: "no"}.get(r["beyond_noise"], "-") if isinstance(r["beyond_noise"], bool) else "-"
        lines.append(f"| {r['config']} | {r['layout']} | {shape} | {feats} | {r['measured_ms']:.0f} "
                     f"[{r['measured_min_ms']:.0f}, {r['measured_max_ms']:.0f}] | {r['predicted_ms']:.0f} | "
                     f"{r['error_pct']:+.1f} [{r['error_lo_pct']:+.1f}, {r['error_hi_pct']:+.1f}] | {bn} |")
    s = side.get("summary", {})
    lines += ["", f"Noise floor (the control measured twice): {_cell(s.get('noise_floor_pct'), '.1f')} points; "
              f"MAPE of the median errors {_cell(s.get('mape_pct'), '.1f')} % over {s.get('configs', '-')} "
              f"configurations, largest {_cell(s.get('max_abs_error_pct'), '.1f')} %."]
    return "\n".join(lines)


def format_summary(side: dict[str, Any]) -> str:
    s, mds = side["summary"], side.get("mds_layouts", {})
    t = TARGETS
    lines = [f"grid: {s['configs']} configuration(s) ok, {s['failed']} failed; noise floor "
             f"{_cell(s['noise_floor_pct'], '.1f')} points",
             f"MAPE {_cell(s['mape_pct'], '.1f')} % (target ≤ {t['mape_pct']:g}), largest "
             f"{_cell(s['max_abs_error_pct'], '.1f')} % (target ≤ {t['max_abs_error_pct']:g})",
             "mds-cpu layouts: " + (", ".join(f"{k} {v:+.1f} %" for k, v in mds.items()) or "-")
             + f" (target ±{t['mds_layout_pct']:g} %)",
             "beyond noise: " + (", ".join(s["beyond_noise"]) or "none")]
    return "\n".join(lines)


def main_grid(a: Any, argv: Sequence[str]) -> int:
    """``--grid FILE [--only A,B | --ci]`` or ``--table CSV``; 2 for a bad grid, 1 if a
    configuration failed."""
    if a.table:
        print(markdown_table(Path(a.table)))
        return 0
    from analysis.errors import AnalysisError
    from analysis.spec import SpecProfile
    from full_model.megatron.setup import SetupError, resolve_source
    from microbench.runtime.results import default_out_dir
    grid = read_grid(a.grid)
    if a.runs:
        grid = dataclasses.replace(grid, configs=tuple(dataclasses.replace(c, runs=a.runs) for c in grid.configs))
    try:
        SpecProfile.from_yaml(a.system)
    except AnalysisError as e:
        raise CrossCheckError(f"--system: {e}") from None
    only = grid.ci if a.ci else ([s for s in a.only.split(",") if s] if a.only else None)
    unknown = [n for n in only or () if n not in {c.name for c in grid.configs}]
    if unknown:
        raise CrossCheckError(f"--only {unknown[0]!r}: not a configuration of {grid.path}")
    try:
        source = resolve_source(a.source)
    except SetupError as e:
        raise CrossCheckError(str(e)) from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    csv = Path(a.csv) if a.csv else Path("benchmarks/results") / f"megatron-grid-{stamp}.csv"
    out = Path(a.out) if a.out else default_out_dir("crosscheck-megatron-grid")
    rows, side = run_grid(grid, only=only, source=source, out=out.resolve(), csv=csv, system=a.system,
                          timeout=a.timeout_s, compute_iters=(a.probe_iters, a.probe_warmup),
                          command="python -m benchmarks.crosscheck_megatron " + " ".join(argv),
                          repeat_control=not a.ci, reuse=a.reuse)  # CI: the path end to end, not the noise
    print(markdown_table(csv))
    print(format_summary(side))
    print(f"# csv: {csv}  machine: {csv.with_suffix('.machine.json')}  runs: {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
