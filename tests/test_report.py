"""analysis.report and analysis.plots on small synthetic run directories (no probes launched:
the rows follow microbench/results.py's schema, written with its RunWriter)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from analysis import load, plots  # noqa: E402
from analysis.predict import predict  # noqa: E402
from analysis.spec import SpecProfile
from analysis.report import ReportError, build_report  # noqa: E402
from microbench.model.config import preset  # noqa: E402
from microbench.runtime.results import RunWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _manifest(**over):
    m = {"probe": "campaign", "model": "tiny", "system": "aurora", "world_size": 2, "hostname": "hostA", "device": "cpu",
         "backend": "gloo", "versions": {"python": "3.11", "torch": "2.13.0+cpu"},
         "peak_tflops": {"fp32": 0.2}}
    m.update(over)
    return m


def write_run(d: Path, *, train: bool = True, **over) -> Path:
    """A run with an allreduce and allgather sweep, workload GEMMs, a peak row and a train summary."""
    with RunWriter(d, _manifest(**over)) as w:
        for kind, factor in (("allreduce", 1.0), ("allgather", 0.5)):
            for i, size in enumerate(2 ** k for k in range(10, 21, 2)):
                t_us = 20 + size / 1e3  # α 20 µs, 1 GB/s algbw
                w.write_row({"probe": kind, "case": f"{kind}-{size}", "kind": kind, "op": kind,
                             "size_bytes": size, "count": size // 4, "dtype": "fp32", "axis": "tp",
                             "group_size": 2, "num_groups": 1, "crosses_nodes": False, "in_place": False,
                             "time_us": t_us, "time_us_median": t_us, "status": "ok",
                             "busbw_gbps": factor * size / t_us / 1e3})
        for op, (m, n, k) in {"qkv": (256, 384, 128), "fc1": (256, 1024, 128)}.items():
            for phase, shape in (("fwd", (m, n, k)), ("dgrad", (m, k, n)), ("wgrad", (n, k, m))):
                flop = 2 * shape[0] * shape[1] * shape[2]
                w.write_row({"probe": "gemm", "case": f"{op}-{phase}", "kind": "gemm", "op": op,
                             "phase": phase, "m": shape[0], "n": shape[1], "k": shape[2], "batch": 1,
                             "dtype": "fp32", "flop": flop, "time_us": flop / 0.1e6, "status": "ok",
                             "tflops": 0.1, "pct_peak": 50.0})
        w.write_row({"probe": "peak", "case": "peak", "kind": "gemm", "op": "peak", "phase": "fwd",
                     "m": 2048, "n": 2048, "k": 2048, "batch": 1, "dtype": "fp32", "time_us": 1e5,
                     "tflops": 0.2, "status": "ok"})
        if train:
            w.write_row({"probe": "full_model.train", "case": "summary", "kind": "train_summary",
                         "status": "ok", "time_us": 2e5, "time_us_median": 2e5, "model": "tiny",
                         "tp": 1, "pp": 1, "dp": 2, "micro_batch": 2, "global_batch": 8, "seq_len": 128,
                         "recompute": "none", "sequence_parallel": False, "zero_stage": 0,
                         "dtype": "fp32"})
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)  # a loaded 2-core host


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "a")


def test_report_writes_every_plot_it_lists(run_a, tmp_path):
    path = build_report([run_a], out_dir=tmp_path / "rep")
    text = path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert set(linked) == {"collectives_allreduce.png", "collectives_allgather.png", "gemm_tflops.png",
                           "step_breakdown.png", "predicted_vs_measured.png", "projection.png"}
    for name in linked:
        assert (path.parent / name).stat().st_size > 1000, name
    listed = text.split("## Plot files", 1)[1]
    assert set(re.findall(r"- (\S+\.png)", listed)) == set(linked)


def test_report_html(run_a, tmp_path):
    path = build_report([run_a], out_dir=tmp_path, fmt="html")
    text = path.read_text()
    assert path.name == "report.html" and text.startswith("<!DOCTYPE html>")
    for src in re.findall(r"<img src='([^']+)'", text):
        assert (tmp_path / src).is_file()


def test_missing_kinds_are_skipped_with_a_note(tmp_path):
    d = tmp_path / "bare"
    with RunWriter(d, _manifest(model=None)) as w:
        w.write_row({"probe": "x", "case": "c", "kind": "memop", "op": "copy", "bytes_moved": 1e6,
                     "time_us": 100.0, "status": "ok"})
    text = build_report([d], out_dir=tmp_path / "rep").read_text()
    assert "Skipped: no collective rows" in text
    assert "Skipped: no GEMM rows" in text
    assert "Skipped: no cross-check data" in text
    assert "alcf-1t" in text  # no model in the manifest → the benchmark's model
    assert not (tmp_path / "rep" / "gemm_tflops.png").exists()


def _labelled(fig):
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax
        assert ax.get_legend() is not None, ax.get_title()


def test_plots_have_labels_titles_legends(run_a, tmp_path):
    df = load(run_a)
    fig = plots.busbw_vs_size(df, "allreduce")
    _labelled(fig)
    assert fig.axes[0].get_xscale() == "log"
    _labelled(plots.gemm_tflops(df, measured_peak={"x": 0.2}))
    spec = SpecProfile.from_yaml("aurora")
    pr = predict(preset("tiny"), spec)
    _labelled(plots.step_breakdown({"spec": pr}))
    import pandas as pd
    _labelled(plots.predicted_vs_measured(pd.DataFrame({"label": ["a"], "measured_s": [1.0],
                                                        "predicted_s": [1.1]})))
    from analysis.project import project
    _labelled(plots.projection({"spec": project(preset("tiny"), spec, [1, 2, 4])}))


def test_fit_line_matches_the_measured_busbw(run_a):
    fits = plots.collective_fits(load(run_a), "allreduce")
    row = fits.iloc[0]
    assert row["alpha_us"] == pytest.approx(20, rel=0.05)
    assert row["fit_busbw_gbps"] == pytest.approx(1.0, rel=0.05)  # factor 1 for n = 2


def test_two_runs_side_by_side(run_a, tmp_path):
    b = write_run(tmp_path / "b", hostname="hostB")
    text = build_report([run_a, b], out_dir=tmp_path / "rep").read_text()
    assert "hostA/cpu/" in text and "hostB/cpu/" in text
    fig = plots.busbw_vs_size(load([run_a, b]), "allreduce")
    assert sum("hostB" in t.get_text() for t in fig.axes[0].get_legend().get_texts()) >= 1


@pytest.mark.parametrize("field,over", [("device", {"device": "cuda"}),
                                        ("versions.torch", {"versions": {"torch": "2.5.0"}}),
                                        ("world_size", {"world_size": 4})])
def test_mismatched_metadata_refused_unless_forced(run_a, tmp_path, field, over):
    b = write_run(tmp_path / "b", train=False, **over)
    with pytest.raises(ReportError, match=re.escape(f"runs differ in {field}")):
        build_report([run_a, b], out_dir=tmp_path / "rep")
    assert build_report([run_a, b], out_dir=tmp_path / "rep", force=True).is_file()


def test_cli_mismatch_exit_2_then_force(run_a, tmp_path):
    b = write_run(tmp_path / "b", train=False, backend="nccl", device="cuda")
    r = _cli(str(run_a), str(b), "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runs differ in device: 'cpu'") and "'cuda'" in lines[0]
    r = _cli(str(run_a), str(b), "--out", str(tmp_path / "rep"), "--force")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.md").is_file()


def test_cli_bad_inputs_one_line_exit_2(tmp_path):
    r = _cli(str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    d = write_run(tmp_path / "bad", train=False)
    with open(d / "rows.jsonl", "a") as fh:
        fh.write("{not json\n")
    r = _cli(str(d))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "rows.jsonl" in r.stderr, r.stderr
    (d / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    r = _cli(str(d))
    assert r.returncode == 2 and "schema_version" in r.stderr
