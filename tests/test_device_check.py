"""``benchmarks/device_check.sh`` on this CPU: every step runs, three widths come back measured
and predicted, the JSON names the device and the probes' rows priced the prediction; a bad flag
value is refused at once. Nothing here asserts a time: the CPU is shared."""
from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from tests.launch import REPO, env, run_bounded

SCRIPT = REPO / "benchmarks" / "device_check.sh"


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One CPU run (~2-3 min on 2 cores), started from outside the repository: the script finds it."""
    where = tmp_path_factory.mktemp("device-check")
    out = where / "run"
    res = run_bounded(["bash", str(SCRIPT), "--device", "cpu", "--out", str(out)], cwd=where,
                      env_=env(PYTHON=sys.executable), timeout=290)
    return res, out


def test_cpu_run_exits_0_with_three_measured_and_predicted_widths(cpu_check):
    res, out = cpu_check
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    with open(out / "device_check.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["hidden"]) for r in rows] == [64, 128, 256]
    for r in rows:
        for col in ("measured_ms", "predicted_ms"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r)
        assert math.isfinite(float(r["error_pct"]))
        assert set(r["bound"].replace(":", " ").split()) <= {"fwd", "recompute", "bwd", "host", "device"}


def test_cpu_run_json_names_the_device_and_the_measured_rows(cpu_check):
    res, out = cpu_check
    doc = json.loads((out / "device_check.json").read_text())
    assert doc["status"] == "ok" and doc["stopped"] is None and doc["failed_steps"] == []
    m = doc["machine"]
    assert m["device"] == "cpu" and m["device_name"] and m["versions"]["torch"] and m["cpu_cores"] >= 1
    assert doc["plan"]["system"] == "aurora"
    for w in doc["widths"]:
        assert w["seconds_by_provenance"]["measured"] > 0  # the probes' rows priced the step
        assert w["sources"]["gemm"].startswith("measured")
        assert all(str(out) in p for p in w["profile"])
    assert doc["probes"]["alcf-1t"]["rows_ok"] > 0 and doc["probes"]["host"]["host_us"]
    assert "hidden" in res.stdout and json.loads(res.stdout.strip().splitlines()[-1])["status"] == "ok"


@pytest.mark.parametrize("args, named", [(["--device", "tpu"], "'tpu'"), (["--widths", "100"], "100"),
                                         (["--time-limit-s", "0"], "0")])
def test_a_bad_flag_value_exits_2_with_one_line_before_anything_runs(tmp_path, args, named):
    out = tmp_path / "run"
    res = run_bounded(["bash", str(SCRIPT), *args, "--out", str(out)], cwd=tmp_path,
                      env_=env(PYTHON=sys.executable), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: benchmarks.device_check: ") and named in lines[0]
    assert not out.exists() and res.stdout == ""


def test_the_time_limit_stops_the_run_cleanly_and_says_so(tmp_path):
    """Two seconds cannot hold the first step (two Python starts with torch): it is stopped,
    the rest is not run, the files are written and the exit code is 1."""
    out = tmp_path / "run"
    res = run_bounded(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--time-limit-s", "2", "--out", str(out)],
                      cwd=tmp_path, env_=env(PYTHON=sys.executable), timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    doc = json.loads((out / "device_check.json").read_text())
    assert doc["status"] == "stopped" and doc["stopped"]["step"] == "probes-1t"
    assert "time limit 2 s" in doc["stopped"]["reason"] and "train-256" in doc["not_run"]
    assert (out / "device_check.csv").read_text().startswith("hidden,")
