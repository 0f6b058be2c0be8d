"""The Megatron-DeepSpeed grid (issue 20): the shipped grid spans what it claims, a bad grid is
refused before anything runs, and the statistics (error, bootstrap interval, noise floor) are
right on hand-made data. The end-to-end run of the grid's CI configurations is in
tests/test_megatron_run.py (it needs the vendored framework)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.crosscheck.grid import (beyond_noise, bootstrap_interval, error_pct, median_components,
                                      noise_floor_pct, read_grid, summary)
from benchmarks.megatron_grid import COLUMNS, markdown_table, write_csv

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "benchmarks" / "megatron_grid.yaml"


def test_the_shipped_grid_spans_sizes_layouts_and_features():
    g = read_grid(GRID)
    cfgs = [c.cfg for c in g.configs]
    assert len(cfgs) >= 12
    hidden = {c.model.hidden for c in cfgs}
    assert min(hidden) == 256 and max(hidden) == 1024
    assert {c.model.num_layers for c in cfgs} >= {2, 8}
    assert {c.model.seq_len for c in cfgs} >= {256, 1024}
    assert {c.parallel.micro_batch for c in cfgs} == {1, 2}
    assert min(c.parallel.num_microbatches for c in cfgs) == 4 and max(c.parallel.num_microbatches for c in cfgs) == 16
    layouts = {(c.parallel.tp, c.parallel.pp, c.parallel.dp) for c in cfgs}
    assert layouts >= {(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)}
    assert {c.parallel.recompute for c in cfgs} == {"none", "full"}
    assert any(c.parallel.sequence_parallel for c in cfgs)
    assert {c.parallel.zero_stage for c in cfgs} == {0, 1, 2}
    # the control runs first and last; CI's two configurations are in the grid
    order = [label for label, _ in g.order()]
    assert order[0] == g.control and order[-1] == f"{g.control}#2" and len(order) == len(cfgs) + 1
    assert len(g.ci) == 2 and [label for label, _ in g.order(g.ci, repeat_control=False)] == list(g.ci)


BASE = "base: {model: mds-cpu}\nconfigs:\n"


@pytest.mark.parametrize("body, expect", [
    (BASE + "  - {name: a, tpp: 2}\n", "configs[0] (a): unknown key 'tpp'"),
    (BASE + "  - {name: a, tp: 0}\n", "configs[0] (a): --tp 0: must be a positive integer"),
    (BASE + "  - {name: a, pp: 2, zero: 2}\n", "configs[0] (a): zero stage 2 with pp 2"),
    (BASE + "  - {name: a, sequence-parallel: true}\n", "configs[0] (a): sequence parallelism with tp 1"),
    (BASE + "  - {name: a, tp: 2}\n  - {name: a, dp: 2}\n", "configs[1] (a): 'name' must be a unique"),
    (BASE + "  - {name: a, tp: 2, iters: 2, warmup: 2}\n", "configs[0] (a): iters 2 must exceed warmup 2"),
    ("control: b\n" + BASE + "  - {name: a, tp: 2}\n", "control 'b' is not a configuration"),
    ("runs: 0\n" + BASE + "  - {name: a, tp: 2}\n", "runs: 0 is not an integer ≥ 1"),
    ("configs: []\n", "a non-empty list 'configs'"),
    ("configs: [\n", "grid.yaml:2: cannot read the grid: expected the node content, but found '<stream end>'"),
    # PyYAML keeps the last of two equal keys without a word
    ("runs: 2\nruns: 5\n" + BASE + "  - {name: a, tp: 2}\n",
     "grid.yaml:2: cannot read the grid: duplicate key 'runs' (first given at line 1)"),
    # a value of the wrong type went into the config as YAML read it: `maybe` turned sequence
    # parallelism on and the grid ran; `1e9` (YAML 1.1: a string) raised a TypeError
    (BASE + "  - {name: a, tp: 2, sequence-parallel: maybe}\n", "configs[0] (a): sequence-parallel: 'maybe' is not true or false"),
    (BASE + "  - {name: a, tp: 2, hidden: 1e9}\n", "configs[0] (a): hidden: '1e9' is not an integer"),
    (BASE + "  - {name: a, tp: true}\n", "configs[0] (a): tp: True is not an integer"),
    (BASE + "  - {name: a, tp: 2, recompute: 1}\n", "configs[0] (a): recompute: 1 is not a string"),
])
def test_a_bad_grid_is_refused_in_one_line_before_anything_runs(tmp_path, body, expect):
    p = tmp_path / "grid.yaml"
    p.write_text(body)
    res = subprocess.run([sys.executable, "-m", "benchmarks.crosscheck_megatron", "--grid", str(p), "--csv",
                          str(tmp_path / "out.csv")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: benchmarks.crosscheck_megatron: ") and expect in err[0], err
    assert not (tmp_path / "out.csv").exists()


def test_runs_below_one_is_refused_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.crosscheck_megatron", "--grid", str(GRID), "--runs", "0",
                          "--csv", str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: benchmarks.crosscheck_megatron: --runs 0: need ≥ 1"]
    assert not (tmp_path / "o.csv").exists()


def test_only_names_a_configuration_of_the_grid(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.crosscheck_megatron", "--grid", str(GRID), "--only",
                          "nosuch", "--csv", str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 2 and "--only 'nosuch'" in res.stderr


def test_error_and_its_bootstrap_interval_on_hand_made_pairs():
    # predictions 10 % above every run: the error is +10 %, and no resample can move it
    assert error_pct([1.1, 2.2, 3.3], [1.0, 2.0, 3.0]) == pytest.approx(10.0)
    assert error_pct([110.0, 90.0, 100.0], [100.0, 100.0, 100.0]) == pytest.approx(0.0)  # medians
    lo, hi = bootstrap_interval([1.1, 1.1, 1.1], [1.0, 1.0, 1.0])
    assert lo == pytest.approx(10.0) and hi == pytest.approx(10.0)
    # one pair 20 % off among two exact ones: resamples range from 0 to +20 %
    lo, hi = bootstrap_interval([1.2, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert lo == pytest.approx(0.0) and hi == pytest.approx(20.0)
    with pytest.raises(ValueError):
        bootstrap_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize("runs, expect", [
    ([3.0, 1.0, 2.0], {"gemm": 1.5, "optimizer": 0.5}),   # odd: the median run's own components
    ([4.0, 1.0, 2.0, 3.0], {"gemm": 2.0, "optimizer": 0.5})])  # even: the two middle runs' mean
def test_the_csv_components_add_up_to_the_median_prediction(runs, expect):
    from types import SimpleNamespace
    # run k's prediction: gemm = total − 0.5, optimizer 0.5 (the components add up to the total)
    bds = [{"gemm": t - 0.5, "optimizer": 0.5} for t in runs]
    fr = SimpleNamespace(predicted_runs_s=runs, predicted_breakdowns_s=bds, comparison=None)
    got = median_components(fr)
    assert {k: v for k, v in got.items() if v} == pytest.approx(expect)
    assert sum(got.values()) == pytest.approx(float(pd.Series(runs).median()))


def _row(config, err, lo, hi, status="ok"):
    return {"config": config, "error_pct": err, "error_lo_pct": lo, "error_hi_pct": hi, "status": status}


def test_noise_floor_and_what_lies_beyond_it():
    rows = [_row("c", 3.0, 1.0, 5.0), _row("x", 9.0, 6.0, 12.0), _row("y", -9.0, -14.0, 1.0),
            _row("z", 2.0, 1.0, 4.0), _row("c#2", -2.0, -4.0, 0.5), _row("f", float("nan"), 0, 0, "failed")]
    floor = noise_floor_pct(rows, "c")
    assert floor == pytest.approx(5.0)
    # x: beyond; y: larger than the floor but its interval holds 0; z: inside the floor
    assert [beyond_noise(r, floor) for r in rows] == [False, True, False, False, False, None]
    assert noise_floor_pct(rows[:-2], "c") is None and beyond_noise(rows[1], None) is None
    for r in rows:
        r["beyond_noise"] = beyond_noise(r, floor)
    s = summary(rows, floor)
    assert s["configs"] == 4 and s["failed"] == 1 and s["beyond_noise"] == ["x"]
    assert s["mape_pct"] == pytest.approx((3 + 9 + 9 + 2) / 4) and s["max_abs_error_pct"] == pytest.approx(9.0)


def test_the_csv_keeps_a_failed_configuration_beside_the_measured_ones(tmp_path):
    ok = {"config": "a", "layout": "tp2", "layers": 2, "hidden": 256, "seq": 256, "mbs": 1, "microbatches": 4,
          "recompute": "none", "sequence_parallel": False, "zero": 0, "measured_ms": 100.0, "measured_min_ms": 90.0,
          "measured_max_ms": 120.0, "predicted_ms": 95.0, "error_pct": -5.0, "error_lo_pct": -8.0,
          "error_hi_pct": -1.0, "beyond_noise": True, "status": "ok"}
    bad = {"config": "b", "layout": "dp2", "layers": 2, "hidden": 256, "seq": 256, "mbs": 1, "microbatches": 4,
           "recompute": "none", "sequence_parallel": False, "zero": 2, "status": "failed",
           "reason": "Megatron-DeepSpeed run failed: boom"}
    csv = tmp_path / "g.csv"
    write_csv([ok, bad], csv)
    df = pd.read_csv(csv)
    assert list(df.columns) == list(COLUMNS) and list(df["status"]) == ["ok", "failed"]
    (tmp_path / "g.machine.json").write_text(json.dumps({"summary": {"noise_floor_pct": 4.0, "mape_pct": 5.0,
                                                                      "configs": 1, "max_abs_error_pct": 5.0}}))
    table = markdown_table(csv)
    assert "| a | tp2 | 256 × 2, 256, 1 × 4 | - | 100 [90, 120] | 95 | -5.0 [-8.0, -1.0] | yes |" in table
    assert "failed: Megatron-DeepSpeed run failed: boom" in table and "ZeRO-2" in table
    assert "Noise floor (the control measured twice): 4.0 points" in table


@pytest.mark.parametrize("text,says", [
    ("Parameters (billion),# GPUs\n3.6,64\n", "not a grid CSV of this benchmark (no column 'config' and "),
    (None, "No such file"),
    ("", "No columns to parse"),
])
def test_table_of_a_file_that_is_not_a_grid_csv_is_one_line_exit_2(tmp_path, capsys, text, says):
    from benchmarks.crosscheck_megatron import main
    csv = tmp_path / "other.csv"
    if text is not None:
        csv.write_text(text)
    assert main(["--table", str(csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: benchmarks.crosscheck_megatron: --table {csv}: "), err
    assert says in err, err


def test_the_controls_repeat_measures_its_probes_again_into_new_directories(tmp_path, monkeypatch):
    """The control's second measurement (``small-tp2#2``, probe cache empty) must not write into
    the directories its first measurement made: a run directory is written once (the full grid
    of 2026-12-02 lost its noise floor to exactly that)."""
    import analysis.crosscheck.probes as probes
    from analysis.crosscheck.grid import read_grid
    made: list[str] = []
    monkeypatch.setattr(probes, "run_command", lambda cmd, **kw: made.append(cmd[cmd.index("--out") + 1]))
    grid = read_grid(REPO / "benchmarks" / "megatron_grid.yaml")
    (label, ctrl), (label2, _) = grid.order()[0], grid.order()[-1]
    assert (label, label2) == ("small-tp2", "small-tp2#2")
    first = probes.measure_probes(ctrl.cfg, text=label, out=tmp_path, done={}, timeout=60)
    again = probes.measure_probes(ctrl.cfg, text=label2.replace("#", "-"), out=tmp_path, done={}, timeout=60)
    assert len(made) == len(set(made)) == len(first) + len(again)
    assert {p.name for p in first} >= {"allreduce-w2-small-tp2", "tp_sync-small-tp2", "gemm-small-tp2"}


def test_a_command_past_its_limit_is_a_failed_row_not_a_traceback(tmp_path, monkeypatch):
    """A probe or framework run killed at ``--timeout-s`` raises ``TimeoutExpired``; the grid
    records the configuration as failed, names the command and the limit, and goes on."""
    import benchmarks.megatron_grid as mg
    import full_model.megatron.setup as setup

    def late(text, cfg, **kw):
        raise subprocess.TimeoutExpired([sys.executable, "-m", "microbench.gemm", "--out", "x"], 5.0)
    monkeypatch.setattr(mg, "plan_config", late)
    monkeypatch.setattr(setup, "framework_identity", lambda source: {"commit": "x", "commit_source": "test"})
    rows, side = mg.run_grid(read_grid(GRID), only=["small-dp2", "mds-pp2"], source=tmp_path, out=tmp_path / "runs",
                             csv=tmp_path / "g.csv", system="aurora", timeout=5.0, compute_iters=(1, 0), command="t")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert rows[0]["reason"] == "microbench.gemm ran past its limit of 5 s and was killed"
    assert pd.read_csv(tmp_path / "g.csv")["status"].tolist() == ["failed", "failed"]


def test_reuse_keeps_every_complete_directory_and_finds_a_sweep_another_configuration_made(tmp_path, monkeypatch):
    """``--reuse`` (resume or re-price a grid): a complete run directory is not measured again,
    and a collective sweep is found under the name of whichever configuration measured it
    first, even when that configuration is not in this run (``--only``)."""
    import analysis.crosscheck.probes as probes
    made: list[str] = []

    class FakePopen:  # the command is recorded, not run
        returncode = 0

        def __init__(self, cmd, **kw):
            made.append(cmd[cmd.index("--out") + 1])

        def communicate(self, timeout=None):
            return "", ""
    monkeypatch.setattr(probes.subprocess, "Popen", FakePopen)
    configs = dict(read_grid(GRID).order())
    first = probes.measure_probes(configs["small-tp2"].cfg, text="small-tp2", out=tmp_path, done={}, timeout=60)
    for d in first:
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"status": "ok"}))
    made.clear()
    assert probes.measure_probes(configs["small-tp2"].cfg, text="small-tp2", out=tmp_path, done={}, timeout=60,
                                 reuse=True) == first and made == []
    dp = probes.measure_probes(configs["small-dp2"].cfg, text="small-dp2", out=tmp_path, done={}, timeout=60, reuse=True)
    assert tmp_path / "probes" / "allreduce-w2-small-tp2" in dp
    assert sorted(Path(m).name for m in made) == ["attention-small-dp2", "gemm-small-dp2", "layer_ops-small-dp2"]
    # a directory whose run did not end ok is not reused (the command runs, and refuses it)
    (first[0] / "manifest.json").write_text(json.dumps({"status": "failed"}))
    made.clear()
    probes.measure_probes(configs["small-tp2"].cfg, text="small-tp2", out=tmp_path, done={}, timeout=60, reuse=True)
    assert made == [str(first[0])]
