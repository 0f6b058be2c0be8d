"""The correctness checks themselves: GEMM tolerance at k = 24,576 (false positives over
seeds, detection of a 1 % error), NaN/inf always wrong, and the collective pattern's
exactness for every group size up to 1,024 ranks."""
from __future__ import annotations

import math

import pytest
import torch

from microbench.checks import count_not_close, gamma_tilde
from microbench.collective import count_wrong, max_summands, pattern, pattern_stride
from microbench.gemm import LAYOUT, gemm_work

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
    got = ref.clone().float()
    assert count_not_close(got[:2], ref[:2], dtype="fp32") == 0
    got[0] = bad
    assert count_not_close(got[:2], ref[:2], dtype="fp32") == 1
    assert count_not_close(got, ref, dtype="fp32") == 2  # an inf reference is no free pass


def test_gemm_check_sees_one_wrong_element_among_correct_ones():
    """fp32 at k = 512: elements ≈ 22, tolerance ≈ 0.005; one element off by 0.05 is caught."""
    work = _gemm(16, 32, 512, dtype="fp32", phase="dgrad", seed=4)
    work.output[0, 0] += 0.05
    assert work.check() == (1, 16 * 32)


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
