"""pytest-benchmark tests of the compute probes' ops for the `tiny` preset (seconds on a CPU).

Run with ``pytest --benchmark-only [--benchmark-json out.json]``; a plain ``pytest`` skips
them. Fixed rounds (pedantic mode) so every rank of an MPI run does the same work. Shapes
come from the probes' shape functions (hence the workload); ``extra_info`` carries the row
columns that ``analysis.load`` reads back. As in the harness, each round runs the probe's
prepare hook untimed first (AdamW's cold cache), and after timing the op runs once more on
fresh data and the probe's own check must find no wrong element.
"""
from __future__ import annotations

from functools import partial

import pytest

from microbench.attention import PATHS, attention_shapes, attention_work
from microbench.model.config import tiny
from microbench.gemm import gemm_shapes, gemm_work
from microbench.layer_ops import adamw_shape, adamw_work, memop_shapes, memop_work

CFG = tiny()
ROUNDS, WARMUP = 10, 2


def _bench(benchmark, make, info: dict) -> None:
    """Time ``make(seed=1).run`` as the harness does, then check ``make(seed=2)``."""
    work = make(seed=1)
    benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})
    prep, setup = work.prepare, None
    if prep is not None:
        def setup() -> None:  # untimed, before every round (pytest-benchmark's setup hook)
            prep()
    benchmark.pedantic(work.run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    t = benchmark.stats.stats.median
    if "flop" in info:
        benchmark.extra_info["tflops"] = info["flop"] / t / 1e12
    if "bytes_moved" in info:
        benchmark.extra_info["gbps"] = info["bytes_moved"] / t / 1e9
    del work
    fresh = make(seed=2)
    fresh.run()
    wrong, checked = fresh.check()
    benchmark.extra_info.update(num_wrong=wrong, num_checked=checked)
    assert wrong == 0 and checked > 0, (info.get("op"), info.get("phase"), wrong, checked)


GEMMS = gemm_shapes(CFG)


@pytest.mark.parametrize("shape", GEMMS, ids=[f"{g['op']}-{g['phase']}" for g in GEMMS])
def test_bench_gemm(benchmark, shape):
    _bench(benchmark, partial(gemm_work, shape, device="cpu"), {"kind": "gemm", **shape})


ATTN = [{**a, "path": p} for a in attention_shapes(CFG) for p in PATHS]


@pytest.mark.parametrize("shape", ATTN, ids=[f"{a['path']}-{a['phase']}" for a in ATTN])
def test_bench_attention(benchmark, shape):
    _bench(benchmark, partial(attention_work, shape, device="cpu"), {"kind": "attention", **shape})


MEMOPS = [{**s, "norm": CFG.model.norm, "head_dim": CFG.model.head_dim,
           "vocab_shard": CFG.model.vocab_size // CFG.parallel.tp} for s in memop_shapes(CFG)]


@pytest.mark.parametrize("shape", MEMOPS, ids=[f"{s['op']}-{s['phase']}" for s in MEMOPS])
def test_bench_layer_op(benchmark, shape):
    _bench(benchmark, partial(memop_work, shape, device="cpu"), {"kind": "memop", **shape})


def test_bench_adamw(benchmark):
    shape = adamw_shape(CFG, max_params=1 << 22)
    _bench(benchmark, partial(adamw_work, shape, device="cpu"), {"kind": "memop", **shape})
