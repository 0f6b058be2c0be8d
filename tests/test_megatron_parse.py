"""Megatron-DeepSpeed log parsing: every per-iteration format, timers, comms, bad input."""
from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from full_model.megatron.logparse import _bare_tflops_formula
from full_model.megatron.__main__ import main
from full_model.megatron.logparse import format_iteration_line, parse_log

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures" / "megatron"
SHARED = REPO.parent / "shared" / "fixtures" / "megatron-deepspeed"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} absent (shared real-log fixtures are not part of the repo)")
    return path


def only_row(path: Path) -> dict:
    df = parse_log(path).iterations
    assert len(df) == 1
    return df.iloc[0].to_dict()


# ---- real public lines (values from the shared README) ------------------------------------

def test_real_aurora_kv_with_lm_and_ds_tflops():
    r = only_row(shared("aurora-24tiles-2024-06-21.log"))
    assert (r["iteration"], r["train_iters"]) == (1, 317892)
    assert r["elapsed_ms"] == 108893.2 and r["global_batch_size"] == 768
    assert r["lm_loss"] == 11.133188 and r["samples_per_second"] == 7.053
    assert r["tokens_per_gpu_per_second"] == 1203.674
    assert (r["tflops_lm"], r["tflops_ds"]) == (49.66, 73.32)
    assert r["format"] == "kv" and r["timestamp"] == "2024-06-21T10:50:42"


def test_real_sunspot_upstream_tgs_without_space():
    df = parse_log(shared("sunspot-2024-04-04.log")).iterations
    assert df["iteration"].tolist() == [1, 2]
    assert df["elapsed_ms"].tolist() == [25849.1, 20298.3]
    assert df["tflops_ds"].tolist() == [38.61, 49.17]
    assert df["tokens_per_gpu_per_second"].tolist() == [633.832, 807.159]


def test_real_polaris_upstream_and_kv_bare_tflops():
    res = parse_log(shared("polaris-2024.log"))
    df = res.iterations
    assert df["iteration"].tolist() == [199, 1]
    assert df["elapsed_ms"].tolist() == [14287.5, 17711.7]
    assert df["tflops"].tolist() == [69.85, 144.87]
    assert df["format"].tolist() == ["upstream", "kv"]
    # upstream "TFLOPs:" and kv dated 2024-04-21 both used the DeepSpeed-style formula
    assert df["tflops_formula"].tolist() == ["ds", "ds"]
    assert df["tflops_ds"].tolist() == [69.85, 144.87]
    assert res.unreadable == []


# ---- synthetic forms ---------------------------------------------------------------------

def test_upstream_with_rank_prefixes_missing_space_nan_and_absent_fields():
    res = parse_log(FIX / "upstream.log")
    df = res.iterations
    assert df["iteration"].tolist() == [10, 11, 12]
    assert df["elapsed_ms"].tolist() == [1234.5, 1200.0, 1190.5]
    assert math.isnan(df["lm_loss"][1])                      # "lm loss: nan"
    assert df["tokens_per_gpu_per_second"][1] == 13653.333   # "second(tgs):", no space before |
    assert df["tflops_ds"][1] == 114.29
    assert math.isnan(df["tflops_ds"][2]) and df["tflops_formula"][2] is None  # absent
    assert df["lineno"].tolist() == [2, 3, 4] and res.unreadable == []


@pytest.mark.parametrize("lineno,formula,column", [
    (1, "ds", "tflops_ds"),     # kv dated 2024-05-02: DeepSpeed-style era
    (2, "lm", "tflops_lm"),     # kv dated 2025-07-01: LM formula era
    (3, "unknown", None),       # kv without a timestamp
    (4, "unknown", None),       # kv dated between the eras
])
def test_kv_bare_tflops_goes_to_the_formula_of_its_era(lineno, formula, column):
    df = parse_log(FIX / "kv_bare_tflops.log").iterations.set_index("lineno")
    row = df.loc[lineno]
    assert row["tflops_formula"] == formula
    for col in ("tflops_lm", "tflops_ds"):
        assert (row[col] == row["tflops"]) if col == column else math.isnan(row[col])


@pytest.mark.parametrize("day,formula", [
    ("2024-04-17", "unknown"), ("2024-04-18", "ds"), ("2024-06-21", "ds"),
    ("2024-06-22", "unknown"), ("2025-06-15", "unknown"), ("2025-06-16", "lm"),
])
def test_bare_tflops_era_boundaries(day, formula):
    assert _bare_tflops_formula("kv", f"{day}T00:00:00") == formula
    assert _bare_tflops_formula("upstream", f"{day}T00:00:00") == "ds"


def test_kv_lm_ds_without_hyphen_behind_deepspeed_logger_prefix():
    r = only_row(FIX / "kv_lm_ds_nohyphen.log")
    assert (r["tflops_lm"], r["tflops_ds"]) == (55.50, 81.25)
    assert r["tflops_formula"] is None and math.isnan(r["tflops"])
    assert r["timestamp"] == "2024-08-09T17:03:44.123"
    assert r["tokens_per_gpu_per_second"] == 2721.0 and r["learning_rate"] == 2.5e-05


def test_deepspeed_pipeline_steps_line():
    df = parse_log(FIX / "ds_pipe.log").iterations
    assert df["format"].tolist() == ["deepspeed_pipe"] * 2
    assert df["iteration"].tolist() == [10, 11]
    assert df["elapsed_ms"].tolist() == pytest.approx([12345.0, 12100.0])
    assert df["lm_loss"].tolist() == [7.1234, 7.0001]
    assert df["samples_per_second"].tolist() == [41.47, 42.31]
    assert df["timestamp"].tolist() == [None, "2024-03-01T11:22:46.001"]


def test_megatron_minmax_timer_block_is_read_with_its_iteration():
    t = parse_log(FIX / "timers.log").timers
    mm = t[t["source"] == "megatron"].set_index("name")
    first = mm.loc["forward-backward"].iloc[0]
    assert (first["min_ms"], first["max_ms"], first["iteration"]) == (12345.67, 12350.01, 3)
    assert mm.loc["batch-generator", "max_ms"] == 3.25
    max_only = mm.loc["forward-backward"].iloc[1]       # "0: max time across ranks (ms):"
    assert max_only["max_ms"] == 12001.5 and math.isnan(max_only["min_ms"])


def test_deepspeed_time_ms_lines_are_timers():
    t = parse_log(FIX / "timers.log").timers
    ds = t[t["source"] == "deepspeed"]
    got = dict(zip(ds["name"], ds["time_ms"]))
    assert got["fwd_microstep"] == 123.45 and got["bwd_microstep"] == 234.56
    assert (got["fwd"], got["bwd"], got["step"]) == (4000.0, 8000.0, 100.0)
    assert ds["iteration"].isna().tolist() == [True] * 5 + [False] * 3


def test_comms_logger_table_keeps_and_flags_negative_latency():
    res = parse_log(FIX / "comms.log")
    c = res.comms
    assert c["op"].tolist() == ["all_reduce", "all_reduce", "broadcast"]
    assert c["count"].tolist() == [4, 10, 2]
    assert c["message_bytes"][0] == pytest.approx(100.66 * 2**20)
    assert c["busbw_gbps"][0] == 47.88 and c["algbw_gbps"][2] == 13.98
    assert c["total_latency_ms"][1] == -2.5                     # kept, not dropped
    assert c["negative_latency"].tolist() == [False, True, False]
    assert any("negative latency" in msg for _, msg in res.warnings)


def test_unreadable_records_are_listed_never_dropped():
    res = parse_log(FIX / "unreadable.log")
    assert [n for n, _ in res.unreadable] == [2, 3]
    assert res.iterations["iteration"].tolist() == [1, 3]
    assert [n for n, _ in res.warnings] == [4]        # "lm loss: bad": read, with a warning


def test_lines_api_equals_path_api():
    path = FIX / "upstream.log"
    by_lines = parse_log(path.read_text().splitlines())
    assert by_lines.iterations.equals(parse_log(path).iterations)


# ---- format_iteration_line: what the reference step writes, the parser reads -----------------

@settings(max_examples=40, deadline=None)
@given(it=st.integers(1, 10**6), elapsed=st.floats(0.1, 1e7), gbs=st.integers(1, 4096),
       loss=st.floats(0.0, 20.0), sps=st.floats(0.0, 1e5), tgs=st.floats(0.0, 1e6),
       tfl=st.floats(0.0, 1e4), seq=st.integers(1, 65536))
def test_format_iteration_line_round_trips(it, elapsed, gbs, loss, sps, tgs, tfl, seq):
    line = format_iteration_line(it, train_iters=10**6, elapsed_ms=elapsed, global_batch_size=gbs,
                                 lm_loss=loss, samples_per_second=sps,
                                 tokens_per_gpu_per_second=tgs, tflops_lm=tfl,
                                 consumed_samples=it * gbs, seq_len=seq)
    r = parse_log([line]).iterations.iloc[0]
    assert (r["iteration"], r["global_batch_size"], r["seq_len"]) == (it, gbs, seq)
    # each value is printed to a fixed number of decimals: off by at most half its last digit,
    # exactly half for a tie such as 0.125 → "0.12" (plus the binary representation's error)
    assert r["elapsed_ms"] == pytest.approx(elapsed, abs=0.05 + 1e-6)
    assert r["lm_loss"] == pytest.approx(loss, abs=5e-7 + 1e-12)
    assert r["tflops_lm"] == pytest.approx(tfl, abs=0.005 + 1e-12)
    assert r["format"] == "kv" and math.isnan(r["tflops_ds"])


def test_format_iteration_line_timestamp_prefix_is_parsed():
    line = format_iteration_line(7, train_iters=10, elapsed_ms=1.0, global_batch_size=8,
                                 lm_loss=2.0, samples_per_second=3.0,
                                 tokens_per_gpu_per_second=4.0, tflops_lm=5.0, tflops_ds=7.5,
                                 consumed_samples=56, seq_len=128,
                                 timestamp=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert line.startswith("[2026-01-02 03:04:05]")
    r = parse_log([line]).iterations.iloc[0]
    assert r["timestamp"] == "2026-01-02T03:04:05" and r["tflops_ds"] == 7.5


# ---- CLI ---------------------------------------------------------------------------------

def test_cli_reports_unreadable_lines_on_stderr(capsys):
    assert main(["parse", str(FIX / "unreadable.log")]) == 0
    err = capsys.readouterr().err
    assert "2 line(s) look like iteration records" in err and "lines 2, 3" in err


def test_cli_json_is_strict_json(capsys):
    assert main(["parse", str(FIX / "comms.log"), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # no NaN tokens
    assert obj["iterations"][0]["elapsed_ms"] == 9000.0 and len(obj["comms"]) == 3


def test_cli_csv_writes_iteration_rows(tmp_path, capsys):
    out = tmp_path / "it.csv"
    assert main(["parse", str(FIX / "upstream.log"), "--csv", str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith("iteration,train_iters,elapsed_ms")
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("case,message", [
    ("empty", "no iteration lines found"),
    ("no_iterations", "no iteration lines found"),
    ("missing", "no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, case, message):
    path = {"empty": tmp_path / "empty.log", "missing": tmp_path / "nope.log",
            "no_iterations": FIX / "no_iterations.log"}[case]
    if case == "empty":
        path.write_text("")
    assert main(["parse", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: {message}"]


def test_module_entry_point_has_no_traceback_for_user_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "full_model.megatron", "parse",
                           str(tmp_path / "missing.log")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_deepspeed_pipe_line_does_not_count_a_step_twice():
    from full_model.megatron.logparse import parse_log
    lines = [
        "steps: 1 loss: 11.1000 iter time (s): 9.000 samples/sec: 56.9",
        " iteration        1/      10 | consumed samples:          512 | elapsed time per iteration (ms): 9000.0 | global batch size:   512 | lm loss: 1.110000E+01 | TFLOPs: 50.00 |",
        "steps: 2 loss: 10.9000 iter time (s): 5.000 samples/sec: 102.4",
        " iteration        2/      10 | consumed samples:         1024 | elapsed time per iteration (ms): 5000.0 | global batch size:   512 | lm loss: 1.090000E+01 | TFLOPs: 90.00 |",
    ]
    it = parse_log(lines).iterations
    assert it["iteration"].tolist() == [1, 2]
    assert set(it["format"]) == {"upstream"}
