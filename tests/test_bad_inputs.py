"""Malformed inputs of issue 12, by class: each gives one line naming the value, the right exit
code, no traceback, and nothing accepted silently.

Also the tally the issue asks for (rerunnable, e.g. against another checkout for "before"):

    python -m tests.test_bad_inputs [--repo PATH]      # prints per class: clean / total
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, env, run_bounded

AR = "microbench.allreduce"
TR = "full_model.train"
GOOD_ITER = (" iteration=       {i}/      10 | consumed_samples=          24 | "
             "elapsed_time_per_iteration_ms={e} | learning_rate=0.0001 | global_batch_size=    8 | "
             "lm loss={loss} | loss_scale=1.0 | actual_seqlen=  128 | samples_per_second=1.000 |")


def _file(tmp: Path, name: str, data: bytes | str) -> str:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def _run(tmp: Path, *, rows: bytes | None = None, manifest: bytes | None = None, closed=True,
         no_rows=False) -> str:
    from microbench.runtime.results import MANIFEST, ROWS, RunWriter
    d = tmp / "run"
    w = RunWriter(d, {"probe": "allreduce", "world_size": 2, "device": "cpu"})
    w.write_row({"probe": "allreduce", "case": "a", "status": "ok"})
    if closed:
        w.close(status="ok")
    if rows is not None:
        (d / ROWS).write_bytes(rows)
    if manifest is not None:
        (d / MANIFEST).write_bytes(manifest)
    if no_rows:
        (d / ROWS).unlink()
    return str(d)


def _row(**fields) -> bytes:
    """One allreduce row as the probe writes it, with ``fields`` replaced."""
    row = {"schema_version": 1, "probe": "allreduce", "case": "a", "bytes": 1024, "dtype": "fp32",
           "world_size": 2, "iters": 3, "time_us": 10.0, "time_us_samples": [9.0, 10.0, 11.0], "status": "ok"}
    return (json.dumps({**row, **fields}) + "\n").encode()


def _log(tmp: Path, bad: str) -> str:
    good = [GOOD_ITER.format(i=i, e="120.0", loss="2.5") for i in (1, 2)]
    return _file(tmp, "log.txt", "\n".join([*good, bad, GOOD_ITER.format(i=4, e="121.0", loss="2.4")]) + "\n")


# (class, id, builder(tmp) -> (module, argv, extra env), expected exit code, text in the line)
CASES = [
    ("cli", "size-nan", lambda t: (AR, ["-b", "nan"], {}), 2, "size 'nan'"),
    ("cli", "size-inf", lambda t: (AR, ["-b", "inf"], {}), 2, "size 'inf'"),
    ("cli", "size-1T", lambda t: (AR, ["-b", "1T", "-e", "1T"], {}), 2, "does not fit one rank's memory"),
    ("cli", "timeout-inf", lambda t: (AR, ["--timeout-s", "inf"], {}), 2, "--timeout-s inf"),
    ("cli", "timeout-nan", lambda t: (AR, ["--timeout-s", "nan"], {}), 2, "--timeout-s nan"),
    ("cli", "iters-0", lambda t: (AR, ["-n", "0"], {}), 2, "-n/--iters 0"),
    ("cli", "layout-vs-world", lambda t: (AR, ["--model", "tiny", "--tp", "2", "--ranks", "3"], {}), 2,
     "≠ world 3"),
    ("cli", "mpi4py-embedded", lambda t: (AR, ["--backend", "mpi4py"], {}), 2, "--backend mpi4py"),
    ("cli", "train-lr-nan", lambda t: (TR, ["--lr", "nan"], {}), 2, "--lr nan"),
    ("cli", "train-bucket-neg", lambda t: (TR, ["--bucket-mb", "-1"], {}), 2, "--bucket-mb -1"),
    ("cli", "train-scale-inf", lambda t: (TR, ["--scale", "inf"], {}), 2, "--scale inf"),
    ("cli", "train-timeout-inf", lambda t: (TR, ["--timeout-s", "inf"], {}), 2, "--timeout-s inf"),
    ("out", "on-a-file", lambda t: (AR, ["--out", _file(t, "f", "x")], {}), 2, "not a directory"),
    ("out", "under-a-file", lambda t: (AR, ["--out", _file(t, "f", "x") + "/run"], {}), 2,
     "is a file, not a directory"),
    ("out", "existing-run", lambda t: (AR, ["--out", _run(t)], {}), 2, "is an existing run"),
    ("out", "unwritable", lambda t: (AR, ["--out", "/proc/microbench-run"], {}), 2,
     "cannot create the run directory"),
    ("out", "train-existing-run", lambda t: (TR, ["--out", _run(t)], {}), 2, "is an existing run"),
    ("results", "binary-rows", lambda t: ("analysis.report", [_run(t, rows=b"\xff\xfe\x00\x89PNG")], {}),
     2, "rows.jsonl: not a UTF-8 text file"),
    ("results", "binary-manifest", lambda t: ("analysis.report", [_run(t, manifest=b"\x89PNG\xff")], {}),
     2, "manifest.json: not a UTF-8 text file"),
    ("results", "incomplete-run", lambda t: ("analysis.report", [_run(t, closed=False)], {}), 2,
     "incomplete run"),
    ("results", "malformed-middle-line", lambda t: ("analysis.report", [_run(t, rows=b'{"x"\n{}\n')], {}),
     2, "rows.jsonl:1: malformed JSON line"),
    ("results", "a-file-not-a-run", lambda t: ("analysis.report", [_file(t, "rows.jsonl", "{}\n")], {}),
     2, "not a run directory"),
    ("results", "manifest-without-rows", lambda t: ("analysis.report", [_run(t, rows=None, no_rows=True)], {}),
     2, "rows.jsonl: missing"),
    ("results", "run-with-zero-rows", lambda t: ("analysis.report", [_run(t, rows=b"")], {}),
     2, "the run has no rows"),
    # a row's known fields (microbench.runtime.rowcheck.row_problem): each was read as data
    ("results", "time-negative", lambda t: ("analysis.report", [_run(t, rows=_row(time_us=-5.0))], {}), 2,
     "rows.jsonl:1: time_us -5.0 is not a finite time ≥ 0 µs"),
    ("results", "time-nan", lambda t: ("analysis.report", [_run(t, rows=_row(time_us=float("nan")))], {}), 2,
     "rows.jsonl:1: time_us nan is not a finite time"),
    ("results", "time-zero-ok", lambda t: ("analysis.report", [_run(t, rows=_row(time_us=0))], {}), 2,
     "rows.jsonl:1: time_us 0 in an ok row"),
    ("results", "sample-text", lambda t: ("analysis.report", [_run(t, rows=_row(time_us_samples=[1.0, "x"]))], {}),
     2, "time_us_samples 'x' is not a finite time"),
    ("results", "shape-fractional", lambda t: ("analysis.report", [_run(t, rows=_row(m=64.5))], {}), 2,
     "rows.jsonl:1: m 64.5 is not an integer ≥ 1"),
    ("results", "bytes-negative", lambda t: ("analysis.report", [_run(t, rows=_row(bytes=-1024))], {}), 2,
     "bytes -1024 is not an integer ≥ 0"),
    ("results", "size-negative", lambda t: ("analysis.report", [_run(t, rows=_row(size_bytes=-1024))], {}), 2,
     "rows.jsonl:1: size_bytes -1024 is not an integer ≥ 0"),
    ("results", "group-of-none", lambda t: ("analysis.report", [_run(t, rows=_row(group_size=0))], {}), 2,
     "rows.jsonl:1: group_size 0 is not an integer ≥ 1"),
    ("results", "median-outside-min-max", lambda t: ("analysis.report", [_run(t, rows=_row(
        time_us_min=9.0, time_us_median=0.0, time_us_max=11.0))], {}), 2,
     "rows.jsonl:1: time_us_median 0.0 is outside the row's own [time_us_min, time_us_max] = [9.0, 11.0]"),
    ("results", "manifest-ranks-per-node-0", lambda t: ("analysis.report", [_run(t, manifest=json.dumps(
        {"schema_version": 1, "probe": "allreduce", "world_size": 2, "ranks_per_node": 0, "status": "ok"}).encode())],
                                                        {}), 2, "manifest.json: ranks_per_node 0 is not an integer ≥ 1"),
    ("results", "key-twice", lambda t: ("analysis.report", [_run(t, rows=_row()[:-2] + b', "time_us": 0.001}\n')], {}),
     2, "rows.jsonl:1: unreadable JSON line (key 'time_us' given twice in one object)"),
    ("results", "manifest-key-twice", lambda t: ("analysis.report", [_run(t, manifest=(
        '{"schema_version": 1, "probe": "allreduce", "world_size": 2, "status": "ok", "world_size": 4}').encode())], {}),
     2, "manifest.json: key 'world_size' given twice in one object"),
    # each reached the profile before: a TypeError traceback, or an α–β fit over 1e308 bytes
    ("results", "op-not-text", lambda t: ("analysis.report", [_run(t, rows=_row(op=["gemm"]))], {}), 2,
     "rows.jsonl:1: op ['gemm'] is not text"),
    ("results", "rate-negative", lambda t: ("analysis.report", [_run(t, rows=_row(busbw_gbps=-3.0))], {}), 2,
     "rows.jsonl:1: busbw_gbps -3.0 is not a finite number ≥ 0"),
    ("results", "bytes-past-int64", lambda t: ("analysis.report", [_run(t, rows=_row(size_bytes=1e308))], {}), 2,
     "rows.jsonl:1: size_bytes 1e+308 is not an integer ≥ 0"),
    ("results", "median-a-list", lambda t: ("analysis.report", [_run(t, rows=_row(time_us_median=[10.0]))], {}), 2,
     "rows.jsonl:1: time_us_median [10.0] is not a time (only *_samples hold a list)"),
    ("results", "manifest-run-id-a-list", lambda t: ("analysis.report", [_run(t, manifest=json.dumps(
        {"schema_version": 1, "probe": "allreduce", "world_size": 2, "run_id": ["a"], "status": "ok"}).encode())], {}),
     2, "manifest.json: run_id ['a'] is not text"),
    ("results", "status-unknown", lambda t: ("analysis.report", [_run(t, rows=_row(status="maybe"))], {}), 2,
     "status 'maybe' is not one of ok, failed, skipped"),
    ("results", "dtype-unknown", lambda t: ("analysis.report", [_run(t, rows=_row(dtype="fp7"))], {}), 2,
     "dtype 'fp7' is not one of"),
    ("results", "dtype-joined-unknown", lambda t: ("analysis.report", [_run(t, rows=_row(dtype="fp32+fp7"))], {}),
     2, "dtype 'fp32+fp7' is not one of"),
    ("results", "world-vs-manifest", lambda t: ("analysis.report", [_run(t, rows=_row(world_size=64))], {}), 2,
     "world_size 64, but the run's manifest says 2"),
    ("results", "digits-past-limit", lambda t: ("analysis.report", [_run(t, rows=(
        '{"schema_version": 1, "probe": "allreduce", "m": ' + "9" * 5000 + '}\n').encode())], {}), 2,
     "rows.jsonl:1: unreadable JSON line"),
    ("results", "empty-system-yaml", lambda t: ("analysis.predict", ["--model", "tiny", "--system",
                                                                     _file(t, "empty.yaml", "")], {}),
     2, "empty.yaml: empty"),
    # libgomp warned and ignored it, and a set variable also stopped the ranks sharing the cores
    ("env", "omp-threads-abc", lambda t: (AR, [], {"OMP_NUM_THREADS": "abc"}), 2, "OMP_NUM_THREADS='abc'"),
    ("env", "omp-threads-0", lambda t: (TR, [], {"OMP_NUM_THREADS": "0"}), 2, "OMP_NUM_THREADS='0'"),
    ("env", "omp-threads-megatron", lambda t: ("full_model.megatron", ["run", "--model", "mds-cpu", "--out",
                                                                       str(t / "m")], {"OMP_NUM_THREADS": "2x"}),
     2, "OMP_NUM_THREADS='2x' is not a positive thread count"),
    # read inside each rank's framework process before: a rank died and the run failed (exit 1)
    ("env", "mds-profile-iter-abc", lambda t: ("full_model.megatron", ["run", "--model", "mds-cpu", "--out",
                                                                       str(t / "m")],
                                               {"MICROBENCH_MDS_PROFILE": str(t / "prof"),
                                                "MICROBENCH_MDS_PROFILE_ITER": "abc"}),
     2, "MICROBENCH_MDS_PROFILE_ITER='abc' is not an iteration number"),
    # any value but "" and "0" read as yes before: "false" let an incomplete run's rows in
    ("env", "allow-incomplete-false", lambda t: ("analysis.report", [_run(t, closed=False)],
                                                 {"MICROBENCH_ALLOW_INCOMPLETE": "false"}), 2, "incomplete run"),
    ("env", "allow-incomplete-maybe", lambda t: ("analysis.report", [_run(t)], {"MICROBENCH_ALLOW_INCOMPLETE": "maybe"}),
     2, "MICROBENCH_ALLOW_INCOMPLETE='maybe': not 1 or 0"),
    # every rank made the directory at start: a path under a file ended each rank (exit 1)
    ("env", "mds-profile-under-a-file", lambda t: ("full_model.megatron", ["run", "--model", "mds-cpu", "--out",
                                                                           str(t / "m")],
                                                   {"MICROBENCH_MDS_PROFILE": _file(t, "f", "x") + "/prof"}),
     2, "MICROBENCH_MDS_PROFILE="),
    ("env", "pmi-rank-abc", lambda t: (AR, [], {"PMI_RANK": "abc", "PMI_SIZE": "2"}), 2, "PMI_RANK='abc'"),
    ("env", "torchrun-vs-pmi", lambda t: (AR, [], {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                    "PMI_RANK": "0", "PMI_SIZE": "2"}), 2,
     "RANK=1, PMI_RANK=0"),
    ("env", "ompi-vs-pmi-size", lambda t: (AR, [], {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
                                                     "PMI_RANK": "0", "PMI_SIZE": "2"}), 2,
     "OMPI_COMM_WORLD_SIZE=4, PMI_SIZE=2"),
    ("env", "rank-outside-world", lambda t: (AR, [], {"PMI_RANK": "5", "PMI_SIZE": "2"}), 2,
     "PMI_RANK=5 is outside"),
    ("env", "master-port-abc", lambda t: (AR, ["--timeout-s", "10"], {"RANK": "0", "WORLD_SIZE": "1",
                                                                     "LOCAL_RANK": "0", "MASTER_PORT": "abc"}),
     2, "MASTER_PORT='abc'"),
    ("env", "master-addr-unresolvable", lambda t: (AR, ["--timeout-s", "10"], {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29544",
        "MASTER_ADDR": "no-such-host.invalid"}), 2, "no-such-host.invalid"),
]

# Megatron logs: the bad record is named (line 3) and refused (3 iterations kept) or its bad
# field cleared (4 kept); the summary stays strict JSON (no NaN/Infinity); exit 0 (the good
# lines are kept).
LOGS = [
    ("huge-integer", GOOD_ITER.format(i="99999999999999999999999", e="120.0", loss="2.5"), 3),
    ("5000-digit-iteration", GOOD_ITER.format(i="9" * 5000, e="120.0", loss="2.5"), 3),
    ("impossible-date", "[2024-13-45 25:61:00] " + GOOD_ITER.format(i=3, e="120.0", loss="2.5"), 4),
    ("elapsed-nan", GOOD_ITER.format(i=3, e="nan", loss="2.5"), 3),
    ("elapsed-inf", GOOD_ITER.format(i=3, e="inf", loss="2.5"), 3),
    ("elapsed-negative", GOOD_ITER.format(i=3, e="-120.0", loss="2.5"), 3),
    ("loss-nan", GOOD_ITER.format(i=3, e="120.0", loss="nan"), 4),
    # each of these was read as a record like any other
    ("iteration-beyond-total", GOOD_ITER.format(i=11, e="120.0", loss="2.5"), 3),
    ("iteration-zero", GOOD_ITER.format(i=0, e="120.0", loss="2.5"), 3),
    ("elapsed-1e308", GOOD_ITER.format(i=3, e="1e308", loss="2.5"), 3),
    ("another-runs-record", GOOD_ITER.format(i=3, e="120.0", loss="2.5").replace("/      10", "/      20"), 3),
    ("two-records-one-line", GOOD_ITER.format(i=3, e="120.0", loss="2.5") * 2, 3),
    ("record-cut-short", GOOD_ITER.format(i=3, e="120.0", loss="2.5")[:60], 3),
    ("loss-negative", GOOD_ITER.format(i=3, e="120.0", loss="-2.5"), 4),
    ("iteration-again", GOOD_ITER.format(i=2, e="120.0", loss="2.5"), 4),
    # the last of the two was taken without a word (9999 ms where the record began with 120 ms)
    ("a-field-twice", GOOD_ITER.format(i=3, e="120.0", loss="2.5") + " elapsed_time_per_iteration_ms=9999.0 |", 3),
]


def invoke(module, argv, extra, *, repo: Path = REPO, timeout: float = 120):
    e = env(**extra)
    if repo != REPO:
        e["PYTHONPATH"] = str(repo)
    cmd = [sys.executable, "-m", module, *argv]
    try:
        return run_bounded(cmd, env_=e, timeout=timeout, cwd=repo)
    except subprocess.TimeoutExpired as t:  # a hang is not a clean refusal (the tally counts it)
        if repo == REPO:
            raise
        return subprocess.CompletedProcess(cmd, -9, t.output or "", f"(timed out after {timeout:g} s)")


def clean_usage_error(res, code: int, text: str) -> bool:
    lines = res.stderr.strip().splitlines()
    return (res.returncode == code and len(lines) == 1 and lines[0].startswith("error:")
            and text in lines[0] and "Traceback" not in res.stderr)


def _strict(text: str):
    def bad(c):
        raise ValueError(c)
    return json.loads(text, parse_constant=bad)


def clean_log(res, kept: int) -> bool:
    if res.returncode != 0 or "Traceback" in res.stderr:
        return False
    try:
        summary = _strict(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False
    return "line" in res.stderr and " 3" in res.stderr and summary.get("num_iterations") == kept


@pytest.mark.parametrize("cls, name, build, code, text", CASES, ids=[c[1] for c in CASES])
def test_bad_input_is_one_line(tmp_path, cls, name, build, code, text):
    module, argv, extra = build(tmp_path)
    res = invoke(module, argv, extra)
    assert clean_usage_error(res, code, text), (res.returncode, res.stderr)


def test_the_good_row_the_corruptions_start_from_is_read(tmp_path):
    """The control for the row cases above: the same row, uncorrupted, reports (exit 0); so does
    a case over buffers of two dtypes, as dp_allreduce's measured sync writes it (``fp32+bf16``:
    refused by the first version of the check, which broke the main job's prediction)."""
    from microbench.runtime.results import read_run
    _, rows = read_run(_run(tmp_path / "mixed", rows=_row(dtype="fp32+bf16")))
    assert rows[0]["dtype"] == "fp32+bf16"
    _, rows = read_run(_run(tmp_path, rows=_row()))
    assert rows[0]["time_us"] == 10.0
    res = invoke("analysis.report", [str(tmp_path / "run"), "--out", str(tmp_path / "rep")], {})
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name, line, kept", LOGS, ids=[n for n, _, _ in LOGS])
def test_bad_megatron_record_is_named_and_summary_is_json(tmp_path, name, line, kept):
    res = invoke("full_model.megatron", ["parse", _log(tmp_path, line)], {})
    assert clean_log(res, kept), (res.returncode, res.stdout[-300:], res.stderr)


def tally(repo: Path) -> dict[str, tuple[int, int]]:
    import tempfile
    out: dict[str, list[int]] = {}
    for cls, name, build, code, text in CASES:
        with tempfile.TemporaryDirectory() as t:
            module, argv, extra = build(Path(t))
            ok = clean_usage_error(invoke(module, argv, extra, repo=repo, timeout=60), code, text)
        out.setdefault(cls, [0, 0])[0] += ok
        out[cls][1] += 1
        print(f"{cls:8} {name:28} {'clean' if ok else 'NOT CLEAN'}", flush=True)
    for name, line, kept in LOGS:
        with tempfile.TemporaryDirectory() as t:
            ok = clean_log(invoke("full_model.megatron", ["parse", _log(Path(t), line)], {}, repo=repo,
                                  timeout=60),
                           kept)
        out.setdefault("megatron", [0, 0])[0] += ok
        out["megatron"][1] += 1
        print(f"{'megatron':8} {name:28} {'clean' if ok else 'NOT CLEAN'}", flush=True)
    return {k: (v[0], v[1]) for k, v in out.items()}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="tally of issue 12's bad inputs")
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout to test (default: this one)")
    counts = tally(ap.parse_args().repo.resolve())
    print(json.dumps({k: f"{a}/{b}" for k, (a, b) in counts.items()}))
