"""pytest-benchmark tests of the compute probes' ops for the `tiny` preset (seconds on a CPU).

Run with ``pytest --benchmark-only [--benchmark-json out.json]``; a plain ``pytest`` skips
them. Fixed rounds (pedantic mode) so every rank of an MPI run does the same work. Shapes
come from the probes' shape functions (hence the workload); ``extra_info`` carries the row
columns that ``analysis.load`` reads back.
"""
from __future__ import annotations

import pytest

from microbench.attention import PATHS, attention_shapes, attention_work
from microbench.config import tiny
from microbench.gemm import gemm_shapes, gemm_work
from microbench.layer_ops import adamw_shape, adamw_work, memop_shapes, memop_work

CFG = tiny()
ROUNDS, WARMUP = 10, 2


def _bench(benchmark, work, info: dict) -> None:
    benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})
    benchmark.pedantic(work.run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    t = benchmark.stats.stats.median
    if "flop" in info:
        benchmark.extra_info["tflops"] = info["flop"] / t / 1e12
    if "bytes_moved" in info:
        benchmark.extra_info["gbps"] = info["bytes_moved"] / t / 1e9


GEMMS = gemm_shapes(CFG)


@pytest.mark.parametrize("shape", GEMMS, ids=[f"{g['op']}-{g['phase']}" for g in GEMMS])
def test_bench_gemm(benchmark, shape):
    _bench(benchmark, gemm_work(shape, seed=1, device="cpu"), {"kind": "gemm", **shape})


ATTN = [{**a, "path": p} for a in attention_shapes(CFG) for p in PATHS]


@pytest.mark.parametrize("shape", ATTN, ids=[f"{a['path']}-{a['phase']}" for a in ATTN])
def test_bench_attention(benchmark, shape):
    _bench(benchmark, attention_work(shape, seed=1, device="cpu"), {"kind": "attention", **shape})


MEMOPS = [{**s, "norm": CFG.model.norm, "head_dim": CFG.model.head_dim,
           "vocab_shard": CFG.model.vocab_size // CFG.parallel.tp} for s in memop_shapes(CFG)]


@pytest.mark.parametrize("shape", MEMOPS, ids=[f"{s['op']}-{s['phase']}" for s in MEMOPS])
def test_bench_layer_op(benchmark, shape):
    _bench(benchmark, memop_work(shape, seed=1, device="cpu"), {"kind": "memop", **shape})


def test_bench_adamw(benchmark):
    shape = adamw_shape(CFG, max_params=1 << 22)
    _bench(benchmark, adamw_work(shape, seed=1, device="cpu"), {"kind": "memop", **shape})
