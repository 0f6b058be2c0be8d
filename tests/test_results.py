"""Results round trip, schema check, malformed lines named."""
import json

import pytest

from analysis import load
from microbench.runtime.results import ROWS, SCHEMA_VERSION, ResultsError, RunWriter, read_run


def write_run(path, rows):
    with RunWriter(path, {"probe": "t", "world_size": 2, "device": "cpu"}) as w:
        for r in rows:
            w.write_row(r)
    return path


def test_round_trip_into_pandas(tmp_path):
    d = write_run(tmp_path / "run", [{"case": "a", "time_us": 1.5, "time_us_samples": [1.0, 2.0]},
                                     {"case": "b", "time_us": 2.5, "status": "skipped"}])
    df = load(d)
    assert list(df["case"]) == ["a", "b"] and df["time_us"].tolist() == [1.5, 2.5]
    assert (df["schema_version"] == SCHEMA_VERSION).all()
    assert df["run_device"].tolist() == ["cpu", "cpu"]
    man, rows = read_run(d)
    assert man["num_rows"] == 2 and man["end_time"] and rows[0]["time_us_samples"] == [1.0, 2.0]


def test_rows_are_on_disk_before_close(tmp_path):
    w = RunWriter(tmp_path / "r", {})
    w.write_row({"case": "x"})
    assert json.loads((tmp_path / "r" / ROWS).read_text())["case"] == "x"  # no close yet
    w.close()


def test_many_runs_below_a_parent(tmp_path):
    write_run(tmp_path / "a", [{"case": "a"}])
    write_run(tmp_path / "b", [{"case": "b"}])
    assert sorted(load(tmp_path)["case"]) == ["a", "b"]


def test_malformed_line_is_named(tmp_path):
    d = write_run(tmp_path / "run", [{"case": "a"}])
    with open(d / ROWS, "a") as f:
        f.write('{"case": "b", oops\n')
    with pytest.raises(ResultsError, match=r"rows.jsonl:2: malformed JSON line"):
        load(d)


def test_other_schema_version_is_refused(tmp_path):
    d = write_run(tmp_path / "run", [])
    man = json.loads((d / "manifest.json").read_text())
    man["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ResultsError, match="schema_version 99"):
        load(d)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ResultsError, match="nope: no such run directory"):
        load(tmp_path / "nope")


def test_nan_is_written_as_null_not_invalid_json(tmp_path):
    d = write_run(tmp_path / "run", [{"case": "a", "busbw_gbps": float("nan")}])
    line = (d / ROWS).read_text()
    assert json.loads(line)["busbw_gbps"] is None
