"""Correctness checks of the compute probes: how far a result may be from a float64 reference.

Every check here counts an element that is NaN or ±inf as wrong, whatever the reference.

GEMM (``count_gemm_wrong``): C = A·B with A (m×k), B (k×n) held in the storage dtype, so
the float64 product of the *stored* operands is the exact reference c. The computed ĉ
differs from it by three independent causes, each bounded per element:

1. Output rounding to the storage dtype: |fl(x) − x| ≤ u_out·|x|, u_out = 2^-p
   (round to nearest, p significand bits: bf16 8, fp16 11, fp32 24, fp64 53).
   Deterministic.
2. Accumulation in fp32 (what cuBLAS's CUBLAS_COMPUTE_32F, oneDNN and torch's CPU kernels
   do for bf16/fp16/fp32; fp64 accumulates in fp64), in an order we do not know. The
   worst-case bound γ_k·|A||B| (γ_k ≈ k·u_acc) grows with k and at k = 24,576 in bf16
   would let a result scaled by 0.99 pass; rounding errors do not add up like that.
   Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
   Comput. 41(5), 2019, Thm 3.1: modelling the rounding errors as independent, mean-zero
   and bounded by u_acc, an inner product of length k satisfies
       |ĉ − c| ≤ γ̃_k(λ)·(|A||B|),   γ̃_k(λ) = exp(λ·√k·u_acc + k·u_acc²/(1 − u_acc)) − 1,
   with probability at least 1 − 2k·exp(−λ²(1 − u_acc)²/2).
3. Input rounding where the engine multiplies in a narrower format than the storage
   (fp32 storage with TF32 or bf16 matmul precision: ``torch.get_float32_matmul_precision``
   'high' → u_in = 2^-11, 'medium' → 2^-8; else 0). Each product a_i·b_i is perturbed by
   (1 + δ_a)(1 + δ_b), |δ| ≤ u_in, independent and mean-zero: by Hoeffding's inequality
   the error Σ a_i·b_i·(δ_a + δ_b) is at most 2λ·u_in·sqrt(Σ a_i²·b_i²) with probability
   at least 1 − 2·exp(−λ²/2) (second-order terms are below u_in² and folded in).

Tolerance: u_out·|c| + (1 + u_out)·(γ̃_k(λ)·(|A||B|) + 2λ·u_in·sqrt(A²·B²)), λ = 10
(``LAMBDA``): the chance that a correct element is flagged is at most (2k + 2)·e^-50 ≈
1e-17 at k = 24,576, i.e. below 1e-13 for a whole 16×256 checked block. At that k in
bf16 the accumulation term is ≈ 1.5 where elements are ≈ 157 (√k for unit-normal data),
so the output rounding (0.39 %) dominates: a result scaled by 0.99 (1 %) is flagged on
every element with |c| > ≈ 240, about an eighth of them (tests/test_checks.py shows both
the false-positive rate over seeds and the detection).

The bound assumes fp32 accumulation. A kernel that reduces partial sums in bf16 (CUDA
split-K under torch's ``allow_bf16_reduced_precision_reduction``) is less accurate than
that and may be flagged: the row then says the result is not fp32-accurate, which is true.

Other ops (``count_not_close``: attention, norms, optimizer): an elementwise bound of
4u + terms·2^-23 times (|ref| + max|ref|), loose (it has an absolute floor of the largest
reference value), but never loose about NaN or inf.
"""
from __future__ import annotations

import math

LAMBDA = 10.0  # probabilistic bound's confidence: failure ≤ (2k+2)·exp(−λ²/2) per element
SIGNIFICAND_BITS = {"bf16": 8, "fp16": 11, "fp32": 24, "fp64": 53}


def unit_roundoff(dtype: str) -> float:
    """u of a storage dtype for loose elementwise checks (fp32 as 2^-11: TF32 engines)."""
    return {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -11, "fp64": 2.0 ** -40}[dtype]


def rounding_unit(dtype: str) -> float:
    """Exact unit roundoff 2^-p of round-to-nearest in ``dtype``."""
    return 2.0 ** -SIGNIFICAND_BITS[dtype]


def input_roundoff(dtype: str) -> float:
    """u_in: rounding of the operands inside the matmul engine (0 where it multiplies the
    stored values exactly)."""
    if dtype != "fp32":
        return 0.0
    import torch
    return {"high": 2.0 ** -11, "medium": 2.0 ** -8}.get(torch.get_float32_matmul_precision(), 0.0)


def accumulation_roundoff(dtype: str) -> float:
    """u_acc: fp32 accumulation for bf16/fp16/fp32 storage, fp64 for fp64."""
    return 2.0 ** -53 if dtype == "fp64" else 2.0 ** -24


def gamma_tilde(k: int, u: float, lam: float = LAMBDA) -> float:
    """Higham & Mary (2019) γ̃_k(λ) = exp(λ√k·u + k·u²/(1 − u)) − 1."""
    return math.expm1(lam * math.sqrt(k) * u + k * u * u / (1 - u))


def gemm_tolerance(a64, b64, ref, *, dtype: str, lam: float = LAMBDA):
    """Per-element tolerance of C = A·B (module docstring); a64 (r×k), b64 (k×q) float64."""
    k = a64.shape[1]
    u_out, u_in = rounding_unit(dtype), input_roundoff(dtype)
    acc = gamma_tilde(k, accumulation_roundoff(dtype), lam) * (a64.abs() @ b64.abs())
    if u_in:
        acc = acc + 2 * lam * u_in * ((a64 * a64) @ (b64 * b64)).sqrt()
    return u_out * ref.abs() + (1 + u_out) * acc


def count_gemm_wrong(got, a, b, *, dtype: str, lam: float = LAMBDA) -> int:
    """Elements of ``got`` (≈ a·b) outside :func:`gemm_tolerance`; NaN and ±inf are wrong."""
    import torch
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    ref = a64 @ b64
    tol = gemm_tolerance(a64, b64, ref, dtype=dtype, lam=lam)
    return count_outside(got, ref, tol)


def count_outside(got, ref, tol) -> int:
    """Elements with |got − ref| > tol, or got not finite (NaN, ±inf are always wrong)."""
    import torch
    got = got.detach().to(torch.float64)
    ok = torch.isfinite(got) & ((got - ref.to(torch.float64)).abs() <= tol)
    return int((~ok).sum().item())


def count_not_close(got, ref, *, dtype: str, bound=None, terms: int = 1) -> int:
    """Elements outside a loose dtype-aware tolerance of a float64 reference (non-GEMM ops).

    ``bound`` defaults to the reference's own magnitude plus its largest value (an absolute
    floor); tolerance (4u + terms·2^-23)·bound. NaN and ±inf in ``got`` are always wrong.
    """
    import torch
    ref = ref.detach().to(torch.float64)
    if bound is None:
        bound = ref.abs() + ref.abs().max()
    return count_outside(got, ref, (4 * unit_roundoff(dtype) + terms * 2.0 ** -23) * bound)
