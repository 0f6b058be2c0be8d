"""The correctness checks themselves, at the alcf-1t shapes in bf16: GEMM (k = 24,576),
attention (head_dim 128) and every layer op (hidden 24,576, ffn/tp 8,192, vocab/tp 2,688):
no false positive over many seeds, and a result scaled by 0.99 caught on every seed; NaN/inf
always wrong; and the collective pattern's exactness for every group size up to 1,024 ranks.
(The README quotes longer runs of the same loops: 200 seeds for every layer op, 200 seeds at
s = 256 and 20 at s = 2,048 for attention.)"""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from microbench.attention import attention_shapes, attention_work
from microbench.harness.checks import count_outside, gamma_tilde, half_ulp
from microbench.harness.collective import count_wrong, max_summands, pattern, pattern_stride
from microbench.model.config import with_layout
from microbench.gemm import LAYOUT, gemm_work
from microbench.harness.modelargs import config_from_args
from microbench.layer_ops import adamw_shape, adamw_work, memop_shapes, memop_work

ALCF_1T = config_from_args(argparse.Namespace(model="alcf-1t", tp=12, pp=None, dp=None, mbs=None), layout="world")

K_1T = 24_576  # alcf-1t hidden: k of qkv/fc1/lm_head fwd and attn_proj/fc2 dgrad at TP 12
SEEDS = 200


def _gemm(m: int, n: int, k: int, *, dtype: str, phase: str, seed: int):
    f = {"m": m, "n": n, "k": k, "dtype": dtype, "layout": LAYOUT[phase]}
    work = gemm_work(f, seed=seed, device="cpu")
    work.run()
    return work


def test_bf16_gemm_check_false_positives_and_1pct_detection_at_k_24576():
    """200 seeds of bf16 C (8×16) = A (8×24,576)·B, cycling the fwd/dgrad/wgrad operand
    layouts: a correct result is never flagged (0 of 25,600 elements), the same result
    scaled by 0.99 is flagged on every seed, and by 2 on nearly every element."""
    flagged, caught_099, min_caught = 0, 0, None
    for seed in range(SEEDS):
        work = _gemm(8, 16, K_1T, dtype="bf16", phase=("fwd", "dgrad", "wgrad")[seed % 3], seed=seed)
        wrong, checked = work.check()
        assert checked == 128
        flagged += wrong
        c = work.output.clone()
        work.output.mul_(0.99)
        scaled = work.check()[0]
        caught_099 += scaled > 0
        min_caught = scaled if min_caught is None else min(min_caught, scaled)
        work.output.copy_(c * 2)
        assert work.check()[0] > 100  # |c| is below its tolerance only when c ≈ 0
    assert flagged == 0
    assert caught_099 == SEEDS and min_caught >= 3, min_caught


def test_fp32_gemm_at_an_exact_1t_tp12_shape_passes_and_catches_099():
    """lm_head fwd of alcf-1t at TP 12 at its exact shape (2048 × 2688 × 24,576) in fp32."""
    work = _gemm(2048, 2688, K_1T, dtype="fp32", phase="fwd", seed=11)
    wrong, checked = work.check()
    assert (wrong, checked) == (0, 16 * 256)
    work.output.mul_(0.99)
    # The fp32 accumulation bound there is ≈ 10·√k·2^-24·(2/π)·k ≈ 1.5 on elements of
    # standard deviation √k ≈ 157: a 1 % error shows where |c| > 150, P(|Z| > 0.95) ≈ 0.34.
    assert 0.25 < work.check()[0] / (16 * 256) < 0.45


def test_old_bound_would_pass_a_wrong_result_the_new_one_catches():
    """The probabilistic bound is far tighter than the worst case γ_k = k·u/(1 − k·u)."""
    u = 2.0 ** -24
    worst = K_1T * u / (1 - K_1T * u)
    assert gamma_tilde(K_1T, u) < worst / 10


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_gemm_check_counts_nan_and_inf(bad):
    work = _gemm(16, 32, 64, dtype="bf16", phase="fwd", seed=1)
    work.output[3, 5] = bad
    assert work.check() == (1, 16 * 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_elementwise_check_counts_nan_and_inf_even_where_ref_is_inf(bad):
    ref = torch.tensor([1.0, -2.0, float("inf"), 4.0], dtype=torch.float64)
    got, tol = ref.clone().float(), torch.full((4,), math.inf, dtype=torch.float64)
    assert count_outside(got[:2], ref[:2], tol[:2]) == 0
    got[0] = bad
    assert count_outside(got[:2], ref[:2], tol[:2]) == 1
    assert count_outside(got, ref, tol) == 2  # an inf reference (or tolerance) is no free pass


def test_half_ulp_by_hand():
    x = torch.tensor([1.0, 1.99, 2.0, -3.0, 0.0, 1e-45], dtype=torch.float64)
    assert half_ulp(x, "bf16").tolist() == [2.0 ** -8, 2.0 ** -8, 2.0 ** -7, 2.0 ** -7, 2.0 ** -134, 2.0 ** -134]
    assert half_ulp(x[:3], "fp32").tolist() == [2.0 ** -24, 2.0 ** -24, 2.0 ** -23]
    assert half_ulp(torch.tensor([1e-7], dtype=torch.float64), "fp16").item() == 2.0 ** -25  # subnormal floor


def test_gemm_check_sees_one_wrong_element_among_correct_ones():
    """fp32 at k = 512: elements ≈ 22, tolerance ≈ 0.005; one element off by 0.05 is caught."""
    work = _gemm(16, 32, 512, dtype="fp32", phase="dgrad", seed=4)
    work.output[0, 0] += 0.05
    assert work.check() == (1, 16 * 32)


# -- attention (alcf-1t: head_dim 128, s = 2,048; here s = 256 as at --scale 0.125) ----------

def _attention(path: str, phase: str, *, seq: int) -> dict:
    a = {s["phase"]: s for s in attention_shapes(ALCF_1T)}[phase]
    return {**a, "heads": 1, "kv_heads": 1, "seq": seq, "path": path, "dtype": "bf16"}  # head 0 is checked


def _seeds_and_099(f: dict, make, seeds: int) -> tuple[int, list[int], int]:
    """Over ``seeds`` seeds: elements flagged in correct results, elements caught after ×0.99
    per seed (the harness's corrupt:R:scale=0.99), elements checked per seed. One thread: the
    tensors are small, and a loop of small ops slows down badly on a shared machine otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _seed_loop(f, make, seeds)
    finally:
        torch.set_num_threads(threads)


def _seed_loop(f: dict, make, seeds: int) -> tuple[int, list[int], int]:
    flagged, caught = 0, []
    for seed in range(seeds):
        work = make(f, seed=seed, device="cpu")
        work.run()
        wrong, checked = work.check()
        flagged += wrong
        for t in work.result():
            t.mul_(0.99)
        caught.append(work.check()[0])
    return flagged, caught, checked


# (seeds, least fraction of elements caught after ×0.99): o is caught on rows that attend
# many keys; dV on keys of the last query blocks; dQ and dK never (cancelling sums).
ATTENTION_RUNS = {("fused", "fwd"): (50, 0.8), ("explicit", "fwd"): (50, 0.8),
                  ("fused", "bwd"): (10, 0.05), ("explicit", "bwd"): (10, 0.15)}


@pytest.mark.parametrize("path, phase", list(ATTENTION_RUNS))
def test_bf16_attention_check_false_positives_and_1pct_detection(path, phase):
    seeds, least = ATTENTION_RUNS[path, phase]
    flagged, caught, checked = _seeds_and_099(_attention(path, phase, seq=256), attention_work, seeds)
    assert flagged == 0
    assert min(caught) >= 1 and sum(caught) / (seeds * checked) > least, (min(caught), sum(caught) / (seeds * checked))


def test_bf16_fused_attention_backward_at_the_alcf_1t_sequence_2048():
    """At s = 2,048 the CPU flash backward rounds dV, dK in bf16 after each of 8 query blocks
    (correct dV up to 1.5 % off): not flagged; ×0.99 still caught (keys of the last block)."""
    flagged, caught, checked = _seeds_and_099(_attention("fused", "bwd", seq=2048), attention_work, 1)
    assert flagged == 0 and caught[0] >= 1 and checked == 3 * 2048 * 128


def test_attention_dq_dk_bounds_are_honest_about_cancellation():
    """dQ, dK are sums whose terms cancel (rows of dS sum to zero): ×0.99 is within their
    derived bound; a doubled dQ or a zeroed dK is caught on more than half the elements (not
    all: the bound is of the order of the smaller elements themselves)."""
    work = attention_work(_attention("explicit", "bwd", seq=256), seed=0, device="cpu")
    work.run()
    dq, dk, _ = work.result()
    keep = dq.clone(), dk.clone()
    dq.mul_(0.99), dk.mul_(0.99)
    assert work.check()[0] == 0
    for grad, bad in ((dq, keep[0] * 2), (dk, 0 * keep[1])):
        grad.copy_(bad)
        assert work.check()[0] > 256 * 128 // 2
        grad.copy_(keep[0] if grad is dq else keep[1])


# -- layer ops (alcf-1t at TP 12, 8 rows of each; the LayerNorm/GELU/dropout variant too) ----

def _layer_cases() -> dict:
    cases = {}
    for cfg in (ALCF_1T, with_layout(ALCF_1T, gated_mlp=False, norm="layernorm", dropout=True)):
        m = cfg.model
        for s in memop_shapes(cfg):
            key = f"{s['op']}-{s['phase']}" + ("-layernorm" if m.norm == "layernorm" and "norm" in s["op"] else "")
            if key not in cases:
                cases[key] = {**s, "rows": 8, "elements": 8 * s["inner"], "dtype": "bf16", "norm": m.norm,
                              "head_dim": m.head_dim, "vocab_shard": m.vocab_size // 12}
    return cases


LAYER_CASES = _layer_cases()
SEEDS_SLOW = {"embedding": 3, "norm": 10, "final_norm": 10}  # 0.1–0.4 s a seed; the rest ≤ 15 ms


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_bf16_layer_op_check_false_positives_and_1pct_detection(case):
    f = LAYER_CASES[case]
    seeds = SEEDS_SLOW.get(f["op"], 200)
    flagged, caught, checked = _seeds_and_099(f, memop_work, seeds)
    assert flagged == 0
    if f["op"] == "cross_entropy":  # the hot logit and the target of each of the 8 rows
        assert min(caught) == 16
    else:  # every seed, and most elements on average
        assert min(caught) >= 1 and sum(caught) / (seeds * checked) > 0.5, (min(caught), sum(caught), checked)


def test_cross_entropy_check_catches_exactly_the_hot_and_target_logits():
    f = LAYER_CASES["cross_entropy-fwd"]
    work = memop_work(f, seed=0, device="cpu")
    work.run()
    (grad,) = work.result()
    grad[:8].mul_(0.99)
    assert work.check() == (16, 8 * 2688)


@pytest.mark.parametrize("adam", ["fused", "torch"])
def test_adamw_check_false_positives_and_1pct_detection(adam):
    """200 seeds of one step on 1,024 parameters: master (fp32) and weight (bf16) both checked;
    decoupled decay (fused AdamW) and L2 decay (torch.optim.Adam, the framework's)."""
    f = {**adamw_shape(ALCF_1T, max_params=1024, adam=adam), "dtype": "bf16"}
    flagged, caught, checked = _seeds_and_099(f, adamw_work, 200)
    assert flagged == 0 and checked == 2048
    assert min(caught) >= 0.95 * checked


# -- collectives ---------------------------------------------------------------------------

GROUP_SIZES = sorted({*range(1, 40), 64, 100, 186, 187, 255, 256, 257, 500, 768, 1000, 1024})


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_pattern_sums_are_exact_for_every_group_size_to_1024(dtype):
    """Summed in the dtype itself in rank order, reversed, as a pairwise tree and in a
    shuffled order: every order gives the float64 sum exactly; no element's sum is zero;
    every rank sends non-zero values; dense (no zero at all) while 11·n ≤ 2^p."""
    count = 4096
    gen = torch.Generator().manual_seed(0)
    for n in GROUP_SIZES:
        vals = torch.stack([pattern(count, rank=r, seed=2, dtype=dtype, device="cpu", summands=n)
                            for r in range(n)])  # [n, count] in the dtype
        exact = vals.double().sum(0)
        assert (exact > 0).all() and (vals != 0).any(dim=1).all(), n
        if n <= max_summands(dtype):
            assert (vals != 0).all(), n
        orders = [torch.arange(n), torch.arange(n).flip(0), torch.randperm(n, generator=gen)]
        for order in orders:
            acc = torch.zeros(count, dtype=vals.dtype)
            for r in order.tolist():
                acc = acc + vals[r]
            assert count_wrong(acc, exact) == 0, (dtype, n)
        tree = vals.clone()
        while tree.shape[0] > 1:
            if tree.shape[0] % 2:
                tree = torch.cat([tree, torch.zeros_like(tree[:1])])
            tree = tree[0::2] + tree[1::2]
        assert count_wrong(tree[0], exact) == 0, (dtype, n)


@pytest.mark.parametrize("n", [2, 23, 24, 256, 768, 1024])
def test_collective_check_catches_zero_nan_and_a_lost_rank_in_bf16(n):
    count = 2048
    vals = [pattern(count, rank=r, seed=1, dtype="bf16", device="cpu", summands=n) for r in range(n)]
    exact = torch.stack(vals).double().sum(0)
    got = exact.to(torch.bfloat16)
    assert count_wrong(got, exact) == 0
    assert count_wrong(torch.zeros_like(got), exact) == count
    nan = got.clone()
    nan[7] = float("nan")
    assert count_wrong(nan, exact) == 1
    lost = (exact - vals[n - 1].double()).to(torch.bfloat16)  # the last rank's share missing
    assert count_wrong(lost, exact) == int((vals[n - 1] != 0).sum())
    assert count_wrong(got * 0.99, exact) > count // 2


def test_pattern_stride_by_hand():
    assert max_summands("bf16") == 23 and max_summands("fp16") == 186  # ⌊256/11⌋, ⌊2048/11⌋
    assert pattern_stride(23, "bf16") == 1 and pattern_stride(24, "bf16") == 2
    assert pattern_stride(768, "bf16") == math.ceil(768 / 23) == 34
    assert pattern_stride(1024, "fp32") == 1


def test_count_wrong_refuses_an_expected_value_the_dtype_cannot_hold():
    with pytest.raises(AssertionError, match="not exact"):
        count_wrong(torch.zeros(1, dtype=torch.bfloat16), torch.tensor([257.0], dtype=torch.float64))
