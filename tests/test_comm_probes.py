"""Communication probes without a world: byte counts and bus factors against hand-computed
values, the DP bucket plan and its extrapolation, the overlap arithmetic, bad flags."""
import argparse
import subprocess
import sys

import pytest

from microbench.harness.collective import sp_elements, tp_activation_elements
from microbench.model.metrics import bus_factor
from microbench.model.config import preset, tiny, with_layout
from microbench.dp_allreduce import DpAllreduce
from microbench.harness.contract import Context
from microbench.overlap import Overlap
from microbench.model.grid import Grid
from microbench.runtime.errors import UsageError
from microbench.model.workload import workload
from tests.launch import REPO, env

# tiny by hand: layer = d·3d + d² + 3·d·f + 2d = 49152 + 16384 + 196608 + 256 = 262400;
# one stage = 4 layers + embedding 512·128 + LM head 512·128 + final norm 128 = 1180800.
TINY_PARAMS = 1_180_800


def ctx_for(cfg, **args):
    ns = argparse.Namespace(**{"bucket_mb": None, "max_bytes": None, "max_bytes_i": None,
                               "zero": None, **args})
    p = cfg.parallel
    return Context(args=ns, world=None, cfg=cfg, grid=Grid(tp=p.tp, pp=p.pp, dp=p.dp))


@pytest.mark.parametrize("kind, n, factor", [("allgather", 2, 0.5), ("allgather", 12, 11 / 12),
                                             ("reduce_scatter", 4, 0.75), ("alltoall", 8, 7 / 8),
                                             ("sendrecv", 2, 1.0)])
def test_bus_factors_by_hand(kind, n, factor):
    assert bus_factor(kind, n) == pytest.approx(factor)


def test_sequence_parallel_pair_is_the_full_activation():
    cfg = with_layout(preset("alcf-1t"), tp=2)  # S = [mbs·s, d] = 2048 · 24576 for both halves
    ctx = ctx_for(cfg)
    assert sp_elements(ctx, "allgather") == ("tp_allgather", 2048 * 24576)
    assert sp_elements(ctx, "reduce_scatter") == ("tp_reduce_scatter", 2048 * 24576)
    assert tp_activation_elements(ctx) == ("tp_allreduce", 2048 * 24576)


def test_sequence_parallel_impossible_for_1t_sc_is_a_usage_error():
    with pytest.raises(UsageError, match="divisible by tp"):  # seq 2048 % tp 12 ≠ 0
        sp_elements(ctx_for(preset("alcf-1t")), "allgather")


def test_pipeline_message_and_its_scatter_gather_share():
    cfg = with_layout(preset("alcf-1t"), tp=2, pp=2, dp=1)
    act = {c.name: c for c in workload(cfg).p2p}
    assert act["pp_activation"].bytes == 2048 * 24576 * 2 == act["pp_gradient"].bytes
    sg = {c.name: c for c in workload(cfg, p2p_scatter_gather=True).p2p}
    assert sg["pp_activation"].elements == 2048 * 24576 // 2


def test_dp_plan_all_buckets_fit():
    plan = DpAllreduce().plan(ctx_for(with_layout(tiny(), dp=2), zero=0))
    assert plan["grad_bytes"] == TINY_PARAMS * 4  # fp32 gradient accumulation
    assert plan["total"] == plan["measured"] == 1 and plan["factor"] == 1.0
    assert plan["bucket"] == TINY_PARAMS  # 3e7-element default bucket > the whole gradient


def test_dp_plan_extrapolates_when_max_bytes_is_small():
    # 0.5 MiB of fp32 = 131072 elements; ceil(1180800 / 131072) = 10 buckets. ZeRO-1 holds a
    # fp32 gradient bucket and a fp32 (tiny's dtype) parameter bucket: 1 MiB per bucket.
    plan = DpAllreduce().plan(ctx_for(with_layout(tiny(), dp=2), zero=1, bucket_mb=0.5,
                                      max_bytes="1M", max_bytes_i=1 << 20))
    assert plan["bucket"] == 131072 and plan["total"] == 10 and plan["measured"] == 1
    assert plan["factor"] == pytest.approx(TINY_PARAMS / 131072)
    assert [c.name for c in plan["ops"]] == ["dp_allreduce", "dp_allgather"]  # DeepSpeed's ZeRO-1


def test_zero1_moves_the_bytes_of_an_allreduce():
    sub = lambda kind: {"kind": kind, "count": 131072, "dtype": "fp32", "group_size": 4}
    ar = DpAllreduce.bus_bytes([sub("allreduce")], 10)
    zero = DpAllreduce.bus_bytes([sub("reduce_scatter"), sub("allgather")], 10)
    assert ar == zero == 131072 * 4 * 10 * 2 * 3 / 4


def test_1t_grad_bytes_follow_fp32_accumulation():
    cfg = with_layout(preset("alcf-1t"), tp=2, pp=1, dp=2)  # as the CLI's --tp 2 --dp 2
    plan = DpAllreduce().plan(ctx_for(cfg, max_bytes="256M", max_bytes_i=256 << 20))
    assert plan["grad_bytes"] == cfg.params_per_rank * 4
    assert plan["bucket_bytes"] == 30_000_000 * 4 and plan["measured"] == 1  # 120 MB + 60 MB bf16
    assert plan["factor"] == pytest.approx(cfg.params_per_rank / 30_000_000)


def test_exposed_fraction_from_its_components():
    rows = [{"variant": v, "status": "ok", "time_us": t, "axis": "dp", "size_bytes": 8}
            for v, t in (("gemm_alone", 100.0), ("collective_alone", 50.0), ("both", 120.0))]
    (summary,) = Overlap().finish(None, rows)
    assert summary["kind"] == "overlap" and summary["exposed_fraction"] == pytest.approx(0.4)
    assert summary["extra"]["time_us_both"] == 120.0 and summary["extra"]["time_us_coll_alone"] == 50.0


BAD = [
    ("sendrecv", ["-b", "1K"], "--pp ≥ 2"),
    ("sendrecv", ["--pp", "2", "-b", "1M", "-e", "1K"], "smaller than"),
    ("sendrecv", ["--pp", "2", "-f", "1"], "step factor"),
    ("dp_allreduce", ["--dp", "2"], "--model"),
    ("dp_allreduce", ["--model", "tiny", "--dp", "1"], "--dp 1"),
    ("dp_allreduce", ["--model", "tiny", "--bucket-mb", "0"], "--bucket-mb"),
    ("dp_allreduce", ["--model", "tiny", "--max-bytes", "lots"], "lots"),
    ("allgather", ["-b", "0"], "'0'"),
    ("reduce_scatter", ["-e", "1K", "-b", "4K"], "smaller than"),
    ("alltoall", ["--model", "tiny"], "no op in the dense step"),
    ("alltoall", ["--place", "in"], "out-of-place"),
    ("overlap", [], "--model"),
    ("overlap", ["--model", "tiny", "--gemms", "fc1"], "name.phase"),
    ("overlap", ["--model", "tiny", "--dp", "1"], "--dp ≥ 2"),
    ("allreduce", ["--backend", "mpi4py"], "needs an MPI launch"),
]


@pytest.mark.parametrize("probe, args, message", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_flags_exit_2_with_one_line(probe, args, message):
    res = subprocess.run([sys.executable, "-m", f"microbench.{probe}", *args], env=env(),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
