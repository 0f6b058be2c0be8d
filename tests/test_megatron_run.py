"""The real Megatron-DeepSpeed run (issue 11): failure detection on synthetic logs, and tiny
real runs of the vendored framework where ``../shared/vendor`` and the ``megatron`` extra exist."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from full_model.logparse import format_iteration_line, parse_log
from full_model.megatron_run import check_iterations
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


def test_framework_term_is_one_delimited_component_that_scales_with_layers_and_microbatches():
    from analysis.predict import FrameworkTerms, predict
    from analysis.profile import load_profile
    from microbench.config import preset, with_layout
    prof = load_profile(system="dgx-h100")
    fw = FrameworkTerms(per_layer_microbatch_s=1e-3, source="measured (test)")
    small = with_layout(preset("tiny"), tp=1, pp=2, dp=1, global_batch=8)
    big = with_layout(small, global_batch=16)  # twice the micro-batches
    base = predict(small, prof)
    with_fw = predict(small, prof, framework=fw)
    assert "framework" not in base.breakdown_s
    assert math.isclose(with_fw.step_time_s - base.step_time_s, with_fw.breakdown_s["framework"])
    assert math.isclose(predict(big, prof, framework=fw).breakdown_s["framework"],
                        2 * with_fw.breakdown_s["framework"])


def test_a_corrupted_or_missing_archive_is_refused(tmp_path):
    from full_model.megatron_setup import ARCHIVES, SetupError, verify_archives
    with pytest.raises(SetupError, match="no such archive"):
        verify_archives(tmp_path)
    for name in ARCHIVES:
        (tmp_path / name).write_bytes(b"not the vendored archive")
    with pytest.raises(SetupError, match="sha256 .* pinned"):
        verify_archives(tmp_path)


@pytest.mark.skipif(not VENDOR.is_dir(), reason="../shared/vendor absent")
def test_the_vendored_archives_match_their_pins():
    from full_model.megatron_setup import verify_archives
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


needs_framework = pytest.mark.skipif(_framework_missing() is not None, reason=_framework_missing() or "")
TINY = ["--model", "tiny", "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "256", "--seq", "64",
        "--vocab", "256", "--mbs", "2", "--gbs", "4", "--dtype", "fp32"]


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_real_framework_trains_without_skipping(tmp_path, layout):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "full_model.megatron", "run", *TINY, *layout, "--iters", "4",
                          "--out", str(out), "--timeout-s", "800"], env=env(), capture_output=True, text=True,
                         timeout=880, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["framework"]["commit"].startswith("39784a0f")
    it = json.loads((out / "iterations.json").read_text())["iterations"]
    its = sorted({r["iteration"] for r in it})
    assert its == [1, 2, 3, 4]
    assert all(r["lm_loss"] is not None and math.isfinite(r["lm_loss"]) for r in it)
    assert all(not r["num_skipped_iterations"] for r in it)


@needs_framework
@pytest.mark.multirank
@pytest.mark.timeout(1500)
def test_crosscheck_megatron_prints_the_table_and_json(tmp_path):
    res = subprocess.run([sys.executable, "-m", "analysis.crosscheck", "megatron", "--model", "tiny", "--layouts", "tp2",
                          "--runs", "1", "--iters", "3", "--warmup", "1", "--no-reference", "--out", str(tmp_path),
                          "--system", "aurora", "--json", "--timeout-s", "600"], env=env(), capture_output=True, text=True, timeout=1450,
                         cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert any(ln.startswith("tp2 ") for ln in lines) and "Megatron ms" in res.stdout
    last = json.loads(lines[-1])
    assert last["megatron_commit"].startswith("39784a0f")
    row = last["layouts"][0]
    assert row["layout"] == "tp2" and row["measured_min_s"] <= row["measured_s"] <= row["measured_max_s"]
    assert math.isclose(sum(row["components"].values()), row["predicted_s"], rel_tol=1e-9)
    assert "framework" in row["components"]
    # interleaved: the compute probes measured again next to the run, which is priced by them
    assert row["predicted_runs_s"] == [row["predicted_s"]]
    assert (tmp_path / "run0-tp2" / "probes" / "gemm-tp2-w2" / "manifest.json").is_file()
    # the framework probe's GEMMs measured at its narrowed shapes, not scaled down
    assert (tmp_path / "probes" / "gemm-narrow-tp2" / "manifest.json").is_file()
