"""The real Megatron-DeepSpeed run (issue 11): failure detection on synthetic logs, and tiny
real runs of the vendored framework where ``../shared/vendor`` and the ``megatron`` extra exist."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from full_model.megatron.logparse import format_iteration_line, parse_log
from full_model.megatron.run import check_iterations
from tests.launch import REPO, SHARED, env

VENDOR = SHARED / "vendor"


def _log(n: int, *, train_iters: int | None = None, skipped_at: int | None = None,
         loss_at: dict[int, float] | None = None) -> list[str]:
    lines = ["some framework noise", "[2026-11-30 03:18:00][I][ezpz/dist:1] world_size=2"]
    for i in range(1, n + 1):
        loss = (loss_at or {}).get(i, 7.0 - 0.1 * i)
        lines.append(format_iteration_line(i, train_iters=train_iters or n, elapsed_ms=100.0 + i,
                                           global_batch_size=4, lm_loss=loss, samples_per_second=40.0,
                                           tokens_per_gpu_per_second=1.0, tflops_lm=0.0, consumed_samples=4 * i,
                                           seq_len=128, num_skipped_iterations=int(i == skipped_at),
                                           timestamp="2026-11-30 03:18:07"))
    return lines


def _check(lines: list[str], train_iters: int, rc: int = 0):
    return check_iterations(parse_log(lines).iterations, train_iters=train_iters, returncode=rc)


def test_a_clean_log_is_ok():
    c = _check(_log(5), 5)
    assert (c.status, c.reasons, c.num_iterations) == ("ok", [], 5)


def test_a_skipped_iteration_fails_the_run():
    c = _check(_log(5, skipped_at=3), 5)
    assert c.status == "failed" and any("skipped iteration(s) [3]" in r for r in c.reasons)


def test_a_nan_loss_fails_the_run():
    c = _check(_log(5, loss_at={4: math.nan}), 5)
    assert c.status == "failed" and any("iteration(s) [4]" in r for r in c.reasons)


def test_a_missing_loss_fails_the_run():
    # ZeRO on gloo without the workaround: the line is printed, the loss is not
    lines = [ln.replace("lm loss=", "no_loss=") if "iteration=       2/" in ln else ln for ln in _log(4)]
    c = _check(lines, 4)
    assert c.status == "failed" and any("no lm loss at iteration(s) [2]" in r for r in c.reasons)


def test_too_few_iterations_fail_the_run():
    c = _check(_log(3, train_iters=6), 6)
    assert c.status == "failed" and any("3 iteration line(s) logged, 6 asked" in r for r in c.reasons)


def test_a_launcher_failure_fails_an_otherwise_clean_log():
    assert _check(_log(4), 4, rc=1).status == "failed"


def test_lines_printed_by_every_rank_count_once():
    # ezpz c45fb19 under torchrun: each rank believes it is rank 0 and prints the line
    lines = _log(4)
    assert _check(lines + lines[2:], 4).num_iterations == 4


def test_a_hung_op_build_is_killed_with_its_compiler_and_its_lock_removed(tmp_path):
    """A stand-in for DeepSpeed's JIT build: it takes the build lock and starts a child (the
    compiler) that never ends. The timeout must end both and free the lock, or every later
    run waits on it (CI of 2026-12-02: a killed run's compilers ran on for 40 min)."""
    import os
    import signal
    from full_model.megatron.run import prebuild_cpu_ops
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    child = tmp_path / "child.pid"
    build = ("import pathlib, subprocess, time; pathlib.Path(%r).touch(); "
             "p = subprocess.Popen(['sleep', '300']); pathlib.Path(%r).write_text(str(p.pid)); time.sleep(300)"
             % (str(lock), str(child)))
    took = prebuild_cpu_ops(dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")), log_path=tmp_path / "b.log",
                            timeout_s=3.0, cmd=[sys.executable, "-c", build])
    assert 3.0 <= took < 60 and not lock.exists()
    pid = int(child.read_text())
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive
    assert f"its lock {lock} removed" in (tmp_path / "b.log").read_text()


def test_a_lock_nobody_builds_under_is_removed_before_the_build(tmp_path):
    """A lock left by a killed build (no process works in the build directory) would make the
    build wait forever: it is removed first, and the log says so."""
    import os
    from full_model.megatron.run import prebuild_cpu_ops
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    wait_for_lock = ("import pathlib, time; l = pathlib.Path(%r)\nwhile l.exists(): time.sleep(0.1)" % str(lock))
    took = prebuild_cpu_ops(dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")), log_path=tmp_path / "b.log",
                            timeout_s=30.0, cmd=[sys.executable, "-c", wait_for_lock])
    assert took < 30 and "removed a stale build lock" in (tmp_path / "b.log").read_text()


def test_a_corrupted_or_missing_archive_is_refused(tmp_path):
    from full_model.megatron.setup import ARCHIVES, SetupError, verify_archives
    with pytest.raises(SetupError, match="no such archive"):
        verify_archives(tmp_path)
    for name in ARCHIVES:
        (tmp_path / name).write_bytes(b"not the vendored archive")
    with pytest.raises(SetupError, match="sha256 .* pinned"):
        verify_archives(tmp_path)


@pytest.mark.skipif(not VENDOR.is_dir(), reason="../shared/vendor absent")
def test_the_vendored_archives_match_their_pins():
    from full_model.megatron.setup import verify_archives
    assert set(verify_archives(VENDOR)) == {"Megatron-DeepSpeed", "ezpz"}


def test_bad_input_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "-m", "full_model.megatron", "run", "--source", "/nonexistent",
                          "--model", "tiny"], env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "/nonexistent" in res.stderr


# ---------------------------------------------------------------------------------------------
# The real framework (tiny fp32 GPT, few iterations)

def _framework_missing() -> str | None:
    if not VENDOR.is_dir():
        return f"{VENDOR} absent: no vendored Megatron-DeepSpeed"
    for mod in ("deepspeed", "ezpz", "transformers", "mpi4py"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} not installed: pip install -e '.[megatron]' && python -m full_model.megatron install"
    return None

@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_only_this_runs_shared_memory_workspaces_are_removed():
    """DeepSpeed's CPU op never unlinks its per-rank workspace: 300 runs left 20 GiB in
    /dev/shm (RAM) on the 24 GiB development VM. Named by address and port, so a run removes
    its own and leaves a concurrent run's alone."""
    import os
    from full_model.megatron.run import SHM_BUFFER, remove_shm_buffers
    mine, other = {"MASTER_ADDR": "127.0.0.9", "MASTER_PORT": "1"}, {"MASTER_ADDR": "127.0.0.9", "MASTER_PORT": "2"}
    files = [Path(SHM_BUFFER.format(uid=os.getuid(), addr=e["MASTER_ADDR"], port=e["MASTER_PORT"], rank=r))
             for e in (mine, other) for r in (0, 1)]
    try:
        for f in files:
            f.write_bytes(b"x")
        assert remove_shm_buffers(mine, 2) == [str(f) for f in files[:2]]
        assert [f.exists() for f in files] == [False, False, True, True]
    finally:
        for f in files:
            f.unlink(missing_ok=True)


needs_framework = pytest.mark.skipif(_framework_missing() is not None, reason=_framework_missing() or "")


def run_entry(tmp_path, script: str) -> subprocess.CompletedProcess:
    """``script`` as the entry point of ``full_model.megatron.rank`` under ``mpiexec -n 2``."""
    from tests.launch import mpiexec
    if mpiexec() is None:
        pytest.skip("no mpiexec (the local extra)")
    (tmp_path / "entry.py").write_text(script)
    return subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "full_model.megatron.rank", str(tmp_path),
                           "entry.py"], env=env(), capture_output=True, text=True, timeout=180, cwd=REPO)


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_a_rank_that_fails_early_ends_the_job_instead_of_waiting_in_mpi_finalize(tmp_path):
    """Under mpiexec a rank whose entry point raises must end the job: left to Python's exit,
    mpi4py's MPI_Finalize waits for the other rank, which waits for it (the grid of 2026-12-02
    lost 13 minutes to a rank-0 EADDRINUSE that way). The other rank here sleeps 600 s. No
    rank reaches MPI_Finalize, so the failing rank unlinks MPICH's node segment itself (before,
    every such job left one in /dev/shm: RAM)."""
    before = set(Path("/dev/shm").glob("mpich_shm_*"))
    res = run_entry(tmp_path, "import time\nfrom mpi4py import MPI\n"
                              "if MPI.COMM_WORLD.Get_rank() == 0:\n    raise RuntimeError('the rendezvous port is taken (test)')\n"
                              "time.sleep(600)\n")
    assert res.returncode != 0
    assert "the rendezvous port is taken (test)" in res.stderr
    assert "full_model.megatron.rank: rank 0 failed; ending it now" in res.stderr
    assert set(Path("/dev/shm").glob("mpich_shm_*")) - before == set()


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_a_finished_script_ends_its_ranks_without_the_teardown_that_can_abort(tmp_path):
    """A rank whose script returned leaves with MPI finalized and no interpreter teardown: in
    CI (2026-12-02) a tp2 run that had logged its last iteration aborted in teardown
    ("terminate called without an active exception", exit 6) and was called failed. The
    stand-in for a teardown that aborts is an exit handler that calls abort()."""
    before = set(Path("/dev/shm").glob("mpich_shm_*"))
    res = run_entry(tmp_path, "import atexit, os\nfrom mpi4py import MPI\n"
                              "atexit.register(os.abort)\n"
                              "print('trained', MPI.COMM_WORLD.Get_rank(), flush=True)\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n").count("trained 0") == 1 and "trained 1" in res.stdout
    assert set(Path("/dev/shm").glob("mpich_shm_*")) - before == set()  # MPI_Finalize ran


TINY = ["--model", "tiny", "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "256", "--seq", "64",
        "--vocab", "256", "--mbs", "2", "--gbs", "4", "--dtype", "fp32"]


def test_each_cpu_rank_builds_its_own_dataset_index_maps(monkeypatch):
    """The fork builds a dataset's index maps on every rank that misses them, into one set of
    files; rank 1 once read rank 0's half-written file. On the CPU accelerator each rank gets a
    --data-cache-path of its own under the run's TMPDIR; a path the command gives is kept, and
    off the CPU nothing is added."""
    from full_model.megatron.rank import _index_cache_per_rank
    args = ["--seq-length", "1024"]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TMPDIR", "/runs/x/tmp")
    paths = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        got = _index_cache_per_rank(args)
        assert got[:2] == args and got[2] == "--data-cache-path"
        paths.append(got[3])
    assert paths == ["/runs/x/tmp/index-cache-rank0", "/runs/x/tmp/index-cache-rank1"]
    given = [*args, "--data-cache-path", "/shared/cache"]
    assert _index_cache_per_rank(given) is given
    assert _index_cache_per_rank([*args, "--data-cache-path=/shared/cache"])[-1] == "--data-cache-path=/shared/cache"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert _index_cache_per_rank(args) is args


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(400)
def test_sigterm_to_a_framework_run_ends_its_ranks_and_the_manifest_says_interrupted(tmp_path):
    """The ranks lead sessions of their own, so a scheduler's SIGTERM to the command (or Ctrl-C)
    never reaches them: before, they trained on after the command had died, with their /dev/shm
    workspaces and no manifest. Now the command ends them, closes the run ``interrupted`` and
    exits 143 with one line. Tests/test_interrupt.py has the same for stand-in ranks."""
    import os
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "full_model.megatron", "run", *TINY, "--tp", "2", "--iters", "5000",
                             "--out", str(out), "--timeout-s", "350"], env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while not ((out / "train.log").is_file() and "iteration=" in (out / "train.log").read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < end, "the run never logged an iteration"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"error: full_model.megatron: interrupted by SIGTERM; every rank ended; "
                                            f"{out}/manifest.json says so")
    m = json.loads((out / "manifest.json").read_text())
    assert (m["status"], m["signal"], m["reasons"][0]) == ("interrupted", "SIGTERM", "interrupted by SIGTERM")
    assert 0 < m["num_iterations"] < 5000
    assert len(m["removed_shm"]) == 2 and not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{m['env']['MASTER_PORT']}_*"))
    left = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(out).encode() in _read(p)]
    assert left == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_real_framework_trains_without_skipping(tmp_path, layout):
    """Also issue 17: ``--out`` relative to where the user stands (each rank starts inside the
    checkout, so a path handed on as typed would point into it)."""
    out, prof = tmp_path / "runs" / "mds", tmp_path / "prof"
    res = subprocess.run([sys.executable, "-m", "full_model.megatron", "run", *TINY, *layout, "--iters", "4",
                          "--out", "runs/mds", "--timeout-s", "800"], env=env(MICROBENCH_MDS_PROFILE=str(prof)),
                         capture_output=True, text=True, timeout=880, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["framework"]["commit"].startswith("39784a0f")
    assert "sha256" in manifest["framework"]["commit_source"]  # the archive it came from, by checksum
    it = json.loads((out / "iterations.json").read_text())["iterations"]
    its = sorted({r["iteration"] for r in it})
    assert its == [1, 2, 3, 4]
    assert all(r["lm_loss"] is not None and math.isfinite(r["lm_loss"]) for r in it)
    assert all(not r["num_skipped_iterations"] for r in it)
    # DeepSpeed's CPU allreduce workspaces (one per rank) are gone with the run, and said so
    port = manifest["env"]["MASTER_PORT"]
    assert len(manifest["removed_shm"]) == 2 and all(port in f for f in manifest["removed_shm"])
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    # and so are the ranks' temporary files (wandb's at import), from a TMPDIR of the run's own
    assert manifest["env"]["TMPDIR"] == str(out / "tmp") and not (out / "tmp").exists()
    # the attention the cross-check prices (framework_fallback): the explicit path, not flash
    import pandas as pd
    ops = pd.read_csv(prof / "ops-rank0.csv")["name"]
    assert ops.eq("aten::baddbmm").any() and ops.eq("aten::_softmax").any()
    assert not ops.str.contains("scaled_dot_product|flash", case=False).any()
    if layout[0] == "--tp":
        _tp_reductions_as_the_workload_counts(prof)


def _tp_reductions_as_the_workload_counts(prof):
    """The opt-in diagnostics (full_model.megatron.profilehook): both ranks call the same TP
    allreduces of the [mbs·s, d] activation (2·64·64 elements), as many per iteration as the
    workload prices — 4 per layer and micro-batch (2 layers, 2 micro-batches) and, once per
    micro-batch, the embedding's forward and the LM head input gradient's backward: 20."""
    import pandas as pd
    from microbench.model.config import preset, with_layout
    from microbench.model.workload import Collective, workload
    calls = [pd.read_csv(prof / f"collectives-rank{r}.csv") for r in (0, 1)]
    act = [c[(c["op"] == "all_reduce") & (c["group_size"] == 2) & (c["elements"] == 2 * 64 * 64)] for c in calls]
    per_it = [a.groupby("iteration").size() for a in act]
    assert list(per_it[0].index) == [1, 2, 3, 4] and (per_it[0] == 20).all() and per_it[0].equals(per_it[1])
    tiny = preset("tiny")
    model = dataclasses.replace(tiny.model, num_layers=2, hidden=64, num_heads=4, num_kv_heads=4, ffn_hidden=256, seq_len=64,
                                vocab_size=256, dtype="fp32")
    cfg = with_layout(dataclasses.replace(tiny, model=model, parallel=dataclasses.replace(tiny.parallel, micro_batch=2)),
                      tp=2, pp=1, dp=1, global_batch=4)
    w = workload(cfg)
    layer = sum(c.count for c in w.collectives if c.axis == "tp" and c.elements == 2 * 64 * 64)
    ends = sum(c.count for c in (*w.first, *w.last) if isinstance(c, Collective) and c.axis == "tp")
    assert cfg.parallel.num_microbatches * (cfg.layers_per_stage * layer + ends) == 20
    assert all((prof / f"{f}-rank{r}.{e}").is_file() for r in (0, 1)
               for f, e in (("iterations", "csv"), ("ops", "csv"), ("meta", "json")))


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(1500)
def test_crosscheck_megatron_prints_the_table_and_json(tmp_path):
    """With a relative ``--out`` from another directory (issue 17)."""
    res = subprocess.run([sys.executable, "-m", "analysis.crosscheck", "megatron", "--model", "tiny", "--layouts", "tp2",
                          "--runs", "1", "--iters", "3", "--warmup", "1", "--no-reference", "--out", "xc",
                          "--probe-iters", "10", "--probe-warmup", "2",
                          "--system", "aurora", "--json", "--timeout-s", "600"], env=env(), capture_output=True, text=True, timeout=1450,
                         cwd=tmp_path)
    tmp_path = tmp_path / "xc"
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert any(ln.startswith("tp2 ") for ln in lines) and "Megatron ms" in res.stdout
    last = json.loads(lines[-1])
    assert last["megatron_commit"].startswith("39784a0f") and "sha256" in last["megatron_commit_source"]
    row = last["layouts"][0]
    assert row["layout"] == "tp2" and row["measured_min_s"] <= row["measured_s"] <= row["measured_max_s"]
    assert math.isclose(sum(row["components"].values()), row["predicted_s"], rel_tol=1e-9)
    assert "framework" in row["components"]
    # interleaved: the compute probes measured again next to the run, which is priced by them
    assert row["predicted_runs_s"] == [row["predicted_s"]]
    assert (tmp_path / "run0-tp2" / "probes" / "gemm-tp2" / "manifest.json").is_file()
    # the framework probe's GEMMs measured at its narrowed shapes, not scaled down
    assert (tmp_path / "probes" / "gemm-narrow-tp2" / "manifest.json").is_file()


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(1500)
def test_the_grid_runs_its_ci_configurations_end_to_end(tmp_path):
    """The grid's two CI configurations (issue 20) end to end, each two probe/framework pairs
    (``--runs 2``; the grid file's three, and its 30 iterations per compute probe case, are
    the benchmark's, kept out of CI's 30 minutes), into the CSV and its machine sidecar."""
    import pandas as pd
    csv = tmp_path / "grid.csv"
    quick = ["--runs", "2", "--probe-iters", "10", "--probe-warmup", "2"]
    res = subprocess.run([sys.executable, "-m", "benchmarks.crosscheck_megatron", "--grid",
                          str(REPO / "benchmarks" / "megatron_grid.yaml"), "--ci", "--csv", str(csv), *quick,
                          "--out", str(tmp_path / "runs"), "--timeout-s", "600"],
                         env=env(), capture_output=True, text=True, timeout=1450, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    df = pd.read_csv(csv)
    assert list(df["config"]) == ["small-tp2", "small-dp2"] and set(df["status"]) == {"ok"}
    assert (df["pairs"] == 2).all() and df["measured_runs_ms"].str.count(";").eq(1).all()
    assert ((df["error_lo_pct"] <= df["error_pct"]) & (df["error_pct"] <= df["error_hi_pct"])).all()
    assert ((df["measured_min_ms"] <= df["measured_ms"]) & (df["measured_ms"] <= df["measured_max_ms"])).all()
    comp = df[[c for c in df.columns if c.startswith("c_")]].sum(axis=1)
    assert ((comp - df["predicted_ms"]).abs() <= 0.01 * df["predicted_ms"]).all()  # components add up
    side = json.loads(csv.with_suffix(".machine.json").read_text())
    assert side["machine"]["cores"] >= 1 and side["machine"]["torch"] and side["framework"]["commit"].startswith("39784a0f")
    assert side["summary"]["configs"] == 2 and "| small-tp2 | tp2 |" in res.stdout
    assert side["suite_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                  text=True).stdout.strip()
    # --reuse over the same run directories measures nothing and prices them again: the same
    # model gives the same CSV (and a configuration's dirs are found, not re-made)
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    again = tmp_path / "again.csv"
    res = subprocess.run([sys.executable, "-m", "benchmarks.crosscheck_megatron", "--grid",
                          str(REPO / "benchmarks" / "megatron_grid.yaml"), "--ci", "--csv", str(again), *quick,
                          "--out", str(tmp_path / "runs"), "--reuse", "--timeout-s", "30"],
                         env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before
    keep = [c for c in df.columns if c != "run_dirs"]
    pd.testing.assert_frame_equal(pd.read_csv(again)[keep], df[keep])
    assert json.loads(again.with_suffix(".machine.json").read_text())["reused_complete_runs"] is True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed (the megatron extra)")
def test_profile_hook_records_a_run_without_the_pipeline_engine(tmp_path, monkeypatch):
    """ZeRO-2 runs with --no-pipeline-parallel: Megatron calls the engine's forward, backward
    and step once per micro-batch. The hook makes an iteration of the micro-batches up to the
    step at the accumulation boundary, and writes its collectives then (before, a run that
    never called ``train_batch`` wrote none)."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from full_model.megatron import profilehook
    for name in profilehook.WRAPPED:  # restored after the test: install wraps them in place
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    monkeypatch.setattr(PipelineEngine, "train_batch", PipelineEngine.train_batch)
    monkeypatch.setattr(profilehook._State, "iteration", 0)
    monkeypatch.setattr(profilehook._State, "rows", [])
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None, async_op=False: None)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    boundary = {"now": False}
    monkeypatch.setattr(DeepSpeedEngine, "forward", lambda self, x: dist.all_reduce(x))
    monkeypatch.setattr(DeepSpeedEngine, "step", lambda self: None)
    monkeypatch.setattr(DeepSpeedEngine, "is_gradient_accumulation_boundary", lambda self: boundary["now"])
    monkeypatch.setenv(profilehook.ENV_ITER, "9")  # no torch.profiler pass in this test
    # a relative DIR, and the rank then changes into the framework's source (as rank.main
    # does): the files still land where the user named (before, every write after install
    # failed and the run logged each step as skipped)
    (tmp_path / "start").mkdir()
    (tmp_path / "source").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    profilehook.install("prof", 0)
    monkeypatch.chdir(tmp_path / "source")
    tmp_path = tmp_path / "start" / "prof"
    engine = object.__new__(DeepSpeedEngine)
    for it in range(2):  # two iterations of two micro-batches; 3 and 5 elements reduced
        for mb in range(2):
            boundary["now"] = mb == 1
            engine.forward(torch.zeros(3 + 2 * it))
            engine.step()
    import pandas as pd
    its = pd.read_csv(tmp_path / "iterations-rank0.csv")
    coll = pd.read_csv(tmp_path / "collectives-rank0.csv")
    assert list(its["iteration"]) == [1, 2] and (its["end_ns"] >= its["start_ns"]).all()
    assert coll.groupby("iteration")["elements"].apply(list).to_dict() == {1: [3, 3], 2: [5, 5]}
    assert set(coll["op"]) == {"all_reduce"} and set(coll["group_size"]) == {2}


def test_the_profile_hook_names_the_python_code_that_called_each_costly_op(tmp_path):
    """stacks-rank{R}.csv: how ZeRO's flatten was found (DeepSpeed's allreduce_bucket calling
    torch.cat). A function of this test costs ≥ 1 ms in one op and is named in its stack; an op
    below the threshold is left out."""
    import pandas as pd
    import torch
    from torch.profiler import ProfilerActivity, profile
    from full_model.megatron import profilehook
    parts = [torch.randn(1 << 20) for _ in range(16)]

    def flatten_the_gradient():
        for _ in range(4):  # 4 × 64 MiB written: tens of ms on any CPU
            torch.cat(parts)

    def tiny_add():
        torch.ones(4).add_(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True,
                 **profilehook._python_frames(torch)) as prof:
        flatten_the_gradient()
        tiny_add()
    profilehook._write_ops(prof, tmp_path / "ops-rank0.csv")
    stacks = pd.read_csv(tmp_path / "stacks-rank0.csv")
    assert list(stacks.columns) == ["name", "stack", "calls", "self_cpu_us", "cpu_total_us"]
    cat = stacks[stacks["name"] == "aten::cat"]
    assert len(cat) == 1 and cat["calls"].iloc[0] == 4 and "flatten_the_gradient" in cat["stack"].iloc[0]
    assert (stacks["self_cpu_us"] >= profilehook.STACK_MIN_US).all()
    assert not stacks["stack"].str.contains("tiny_add").any()


def test_a_free_port_is_taken_below_the_kernels_ephemeral_range(tmp_path, monkeypatch):
    """The grid's zero1-dp2 run of 2026-12-03 died on EADDRINUSE at port 48371: ``bind(0)``
    hands out ports of the ephemeral range (32768–60999 here), which any outgoing connection
    may take before the store binds. The rendezvous port now comes from below that range."""
    from microbench.runtime import launch
    span = tmp_path / "range"
    span.write_text("25000\t60999\n")  # a lower edge the real one (32768 on most Linux) is not
    monkeypatch.setattr(launch, "EPHEMERAL_RANGE", span)
    assert launch.ephemeral_range() == (25000, 60999)
    ports = {launch.free_port() for _ in range(20)}
    assert all(20000 <= p < 25000 for p in ports)
    span.write_text("not a range\n")  # unreadable: the kernel's own choice, as before
    assert launch.ephemeral_range(span) is None and 0 < launch.free_port() <= 65535


@needs_framework
def test_a_taken_rendezvous_port_relaunches_once_on_another(tmp_path, monkeypatch):
    """When the store's port is taken anyway (torch's own EADDRINUSE, from a real TCPStore on
    a held port), nothing ran: the run starts once more on a fresh port, keeps the first log,
    and its manifest says so."""
    import datetime
    import socket
    import torch.distributed as dist
    from full_model.megatron import run as mrun
    from full_model.megatron.__main__ import build_parser
    from full_model.megatron.setup import resolve_source
    from microbench.harness.modelargs import config_from_args
    from microbench.runtime import launch
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    first, real = iter([busy]), launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda **kw: next(first, None) or real(**kw))
    tried = []

    def fake_launch(cmd, rank_cmd, *, n, env, log_path, timeout_s):
        tried.append(int(env["MASTER_PORT"]))
        (Path(env["TMPDIR"]) / "tmpx1wandb-media").mkdir(exist_ok=True)  # what wandb leaves at import
        try:
            store = dist.TCPStore("127.0.0.1", tried[-1], 1, True, timeout=datetime.timedelta(seconds=5))
        except Exception as exc:  # what a rank prints when its store cannot bind
            log_path.write_text(f"{type(exc).__module__}.{type(exc).__name__}: {exc}\n")
            return 1
        del store
        log_path.write_text("\n".join(_log(2)) + "\n")
        return 0

    monkeypatch.setattr(mrun, "_launch", fake_launch)
    args = build_parser().parse_args(["run", *TINY, "--dp", "2", "--iters", "2", "--launcher", "spawn"])
    cfg = config_from_args(args, layout="world")
    try:
        check = mrun.run(cfg, mrun.RunOptions(source=resolve_source(None), out=tmp_path / "run", train_iters=2,
                                              launcher="spawn", timeout_s=120))
    finally:
        held.close()
    assert tried[0] == busy and tried[1] != busy and len(tried) == 2
    assert check.status == "ok"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["relaunched"]["first_returncode"] == 1 and str(busy) in manifest["relaunched"]["reason"]
    assert manifest["env"]["MASTER_PORT"] == str(tried[1])
    assert "EADDRINUSE" in (tmp_path / "run" / "train.attempt1.log").read_text()
    # the ranks' temporary files went with the run, listed
    assert "tmpx1wandb-media" in manifest["removed_tmp"] and not (tmp_path / "run" / "tmp").exists()
