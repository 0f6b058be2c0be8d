"""Harness pieces: sizes, statistics, stability warnings, bus-bandwidth factors, bad flags."""
import sys

import pytest

from microbench.harness.collective import count_wrong, pattern
from microbench.model.metrics import bus_factor
from microbench.harness.options import parse_size
from microbench.harness.timing import stability_warning, summarize
from microbench.runtime.errors import UsageError
from tests.launch import env, run_bounded


@pytest.mark.parametrize("text, n", [("1K", 1024), ("16M", 16 << 20), ("1G", 1 << 30),
                                     ("100", 100), ("256MB", 256 << 20), ("1.5K", 1536)])
def test_binary_size_suffixes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["0", "-1K", "abc", "1.3"])
def test_bad_sizes_are_named(bad):
    with pytest.raises(UsageError, match=repr(bad).replace("'", ".")):
        parse_size(bad)


@pytest.mark.parametrize("kind, n, factor", [
    ("allreduce", 2, 1.0), ("allreduce", 4, 1.5), ("allreduce", 12, 22 / 12),
    ("allgather", 4, 0.75), ("reduce_scatter", 8, 7 / 8), ("alltoall", 2, 0.5),
    ("sendrecv", 2, 1.0), ("broadcast", 8, 1.0)])
def test_nccl_tests_bus_factors(kind, n, factor):
    assert bus_factor(kind, n) == pytest.approx(factor)


def test_group_of_one_has_no_bus_bandwidth():
    assert bus_factor("allreduce", 1) is None


def test_summary_statistics_by_hand():
    s = summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s["time_us_median"] == 3.0 and s["time_us_min"] == 1.0 and s["time_us_max"] == 100.0
    assert s["time_us_mean"] == 22.0 and s["time_us_p95"] == 100.0


def test_stability_warning_gives_the_number():
    noisy = summarize([1.0, 1.0, 10.0, 1.0])
    assert "% of the mean over 4 iterations" in stability_warning(noisy, 4)
    assert stability_warning(summarize([10.0, 10.1, 9.9, 10.0]), 4) is None


def test_pattern_is_never_zero_and_differs_per_rank():
    import torch
    a = pattern(1000, rank=0, seed=1, dtype="bf16", device="cpu")
    b = pattern(1000, rank=1, seed=1, dtype="bf16", device="cpu")
    assert (a != 0).all() and not torch.equal(a, b)
    assert not torch.equal(a, pattern(1000, rank=0, seed=2, dtype="bf16", device="cpu"))


def test_count_wrong_is_exact_and_counts_nan():
    import torch
    exp = torch.tensor([3.0, 5.0, 7.0, 9.0])
    assert count_wrong(torch.tensor([3.0, 5.0, 7.0, 9.0]), exp) == 0
    assert count_wrong(torch.tensor([3.0, 6.0, 7.0, float("nan")]), exp) == 2


@pytest.mark.parametrize("args, message", [
    (["-b", "1X"], "size '1X'"),
    (["-n", "0"], "-n/--iters 0"),
    (["-b", "1M", "-e", "1K"], "-e 1K is smaller than -b 1M"),
    (["-f", "1"], "-f 1.0"),
    (["--model", "gpt9"], "unknown preset; known: alcf-1t"),
    (["--model", "alcf-1t", "--tp", "7"], r"num_heads(192) % tp(7)"),
    (["--backend", "hccl"], "--backend 'hccl'"),
    (["-d", "fp8"], "-d/--dtype 'fp8'"),
    (["--tp", "0"], "--tp 0"),
])
def test_bad_flags_exit_2_with_one_line(args, message):
    res = run_bounded([sys.executable, "-m", "microbench.allreduce", *args], env_=env(), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: microbench.allreduce:")
    assert message in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("module, args", [
    ("microbench.sendrecv", ["--model", "tiny", "--pp", "2", "--mode", "bogus"]),
    ("microbench", ["--no-such-flag"]),
    ("analysis.predict", ["--tp", "x"]),
    ("full_model.train", ["--recompute", "some"]),
])
def test_argparse_errors_are_one_line_too(module, args):
    res = run_bounded([sys.executable, "-m", module, *args], env_=env(), timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
