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
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from microbench.harness.cli import ArgumentParser
from microbench.runtime.results import iter_run_dirs, read_run

from analysis.load import load_run
from analysis.report_sections import (DEFAULT_MODEL, ReportError, Run, Section, Target, cell_text,
                                      collective_sections, gemm_section, prediction_sections)

CHECKED = ("device", "backend", "versions.torch", "schema_version", "world_size")


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


def read_runs(run_dirs: Iterable[str | os.PathLike], *, allow_incomplete: bool | None = None) -> list[Run]:
    """Every run named, each with rows: a run without a single row has nothing to report and
    is refused by name (a report of nothing that exits 0 would read as a success)."""
    dirs = list(run_dirs)
    if not dirs:
        raise ReportError("no run directory given")
    runs, seen = [], {}
    for d in iter_run_dirs(dirs):
        manifest, _ = read_run(d)
        rows = load_run(d, allow_incomplete=allow_incomplete)
        if rows.empty:
            raise ReportError(f"{d}: the run has no rows (status {manifest.get('status')}): nothing was "
                              "measured, so there is nothing to report")
        label = f"{manifest.get('hostname', '?')}/{manifest.get('device', '?')}/{manifest.get('run_id', d.name)}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label += f"#{seen[label]}"
        runs.append(Run(Path(d), manifest, rows.assign(_run=label), label))
    return runs


# ---------------------------------------------------------------------------------------------
# Rendering


def _md_table(t: pd.DataFrame) -> str:
    cols = [str(c) for c in t.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in t.iterrows():
        lines.append("| " + " | ".join(cell_text(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |")
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
            parts.append(s.table.map(cell_text).to_html(index=False, escape=True))
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
                 fmt: str = "md", force: bool = False, target: Target | tuple | None = None,
                 allow_incomplete: bool | None = None) -> Path:
    """Write ``report.md`` (or ``report.html``) and its PNG plots into ``out_dir`` and return the
    report's path. ``out_dir`` defaults to ``RUN_DIR/report`` for one run, else
    ``report-<run ids>`` in the working directory. Raises :class:`ReportError` (a ValueError)
    or :class:`microbench.runtime.results.ResultsError` on bad input or mismatched runs."""
    if fmt not in ("md", "html"):
        raise ReportError(f"format must be 'md' or 'html', got {fmt!r}")
    if isinstance(target, tuple):
        target = Target(*target)
    target = target or Target()
    runs = read_runs(run_dirs, allow_incomplete=allow_incomplete)
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
    ap.add_argument("--allow-incomplete", action="store_true", default=None,
                    help="report runs whose manifest was never closed (every rank died); same as "
                         "MICROBENCH_ALLOW_INCOMPLETE=1")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    try:
        path = build_report(a.run_dirs, out_dir=a.out, fmt=a.format, force=a.force,
                            target=Target(model=a.model, system=a.system, include_failed=a.include_failed),
                            allow_incomplete=a.allow_incomplete)
    except (ValueError, OSError) as e:  # ResultsError and ReportError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
