"""Correctness checks of the compute probes: how far a result may be from a float64 reference.

Every check here counts an element that is NaN or ±inf as wrong, whatever the reference, and
every tolerance is derived from a rounding model of the computation, not chosen: a correct
result must never be flagged, and a result scaled by 0.99 must be, wherever the data allow
(tests/test_checks.py measures both). Notation: u = 2^-p, the unit roundoff of the storage
dtype (bf16 2^-8); u_acc = 2^-24, fp32 (what every kernel here computes in); ``half_ulp(y)``
the exact error bound of rounding y to nearest in the dtype (between u·|y|/2 and u·|y|);
``rounded(y, δ)`` = δ + half_ulp(|y| + δ), the bound of a value computed with error ≤ δ and
then rounded once to the dtype.

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
every element with |c| > ≈ 240, about an eighth of them.

The bound assumes fp32 accumulation. A kernel that reduces partial sums in bf16 (CUDA
split-K under torch's ``allow_bf16_reduced_precision_reduction``) is less accurate than
that and may be flagged: the row then says the result is not fp32-accurate, which is true.

Attention and layer ops: :func:`attention_tolerances` and :func:`layer_op_tolerance` carry
their derivations. What they cannot do, and why: a 1 % error is invisible in bf16 wherever
the exact result is a cancelling sum, since a sound bound of the roundings of its terms
(λ·u·sqrt(Σ terms²)) is then as large as the result. The probes' check data are therefore
chosen so that the results that can be checked tightly do not cancel (attention's V and dO
positive, rotary's operands of one sign per half); dQ and dK (rows of dS sum to zero) keep
an honest bound that catches NaN, zeros and large errors but not 1 %.
"""
from __future__ import annotations

import math

LAMBDA = 10.0  # probabilistic bound's confidence: failure ≤ (2k+2)·exp(−λ²/2) per element
SIGNIFICAND_BITS = {"bf16": 8, "fp16": 11, "fp32": 24, "fp64": 53}
MIN_EXPONENT = {"bf16": -126, "fp16": -14, "fp32": -126, "fp64": -1022}  # smallest normal 2^e
FP32_OPS = 16  # fp32 roundings allowed inside a fused op (a few ops, ≤ 4-ulp transcendentals)


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


def half_ulp(x, dtype: str):
    """Half the spacing of ``dtype`` at |x| (x float64): the largest error of rounding x to
    nearest. Never below half the subnormal spacing, so it does not vanish at 0."""
    import torch
    emin = MIN_EXPONENT[dtype]
    e = torch.frexp(x.abs())[1].to(torch.int64) - 1  # |x| ∈ [2^e, 2^(e+1))
    e = torch.where(x == 0, emin, e).clamp(min=emin)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - SIGNIFICAND_BITS[dtype])


def rounded(ref, err, dtype: str):
    """Tolerance of a value computed with absolute error ≤ ``err``, then rounded to ``dtype``."""
    return err + half_ulp(ref.abs() + err, dtype)


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



# -- attention ------------------------------------------------------------------------------

def attention_tolerances(q, k, v, dout=None, *, dtype: str, grad_blocks: tuple[int, int] | None = None,
                         lam: float = LAMBDA) -> dict:
    """float64 references and tolerances of causal softmax(Q·Kᵀ/√d)·V and its gradients for
    the g query heads that share one KV head: q [g, n, d], k, v [n, d], dout like q (or None
    for the forward only). Returns {"o": (ref, tol)}, and "dq", "dk", "dv" with ``dout``.

    The query heads are stacked into one [g·n, d] query matrix; P (g·n × n) is causal per
    head. Error sources of any kernel that keeps fp32 scores (flash, memory-efficient, math
    SDPA, which upcasts bf16) or rounds them to the dtype (the explicit Q·Kᵀ, ×scale,
    softmax, P·V path), each modelled as independent, mean-zero and bounded:

    * a score s_ij is off by ε_ij, |ε_ij| ≤ e_ij = 2u|s_ij| (Q·Kᵀ output and the scale
      product rounded) + γ̃_d·scale·(|Q||K|ᵀ)_ij (fp32 accumulation) + 16u_acc(|s| + |lse| + 1)
      (fp32 exp, max and log-sum-exp; lse as recomputed by a flash backward);
    * a probability is rounded to the dtype before P·V (flash kernels round exp(s − m) on
      the way to the second GEMM, the explicit path stores P): p(1 + η), |η| ≤ u;
    * fp32 accumulation of P·V and of the normaliser (γ̃_n), output rounding (half an ulp).

    Forward. With the normalisation, Δp_ij = p_ij(ε_ij − Σ_k p_ik ε_ik), so
    Δo_i = Σ_j p_ij ε_ij (v_j − o_i) + Σ_j p_ij η_ij v_j (or (v_j − o_i) if the kernel
    renormalises the rounded P; both bounded below). Hoeffding over the independent ε, η:
    |Δo_ic| ≤ λ·sqrt(Σ_j p_ij²[e_ij²(v_jc − o_ic)² + u²(v_jc² + (v_jc − o_ic)²)]) with
    probability ≥ 1 − 2e^-50; second-order terms (p·e²) and TF32 input rounding (fp32 with
    matmul precision 'high') are added deterministically. With V positive (U[1,2]) o has no
    cancellation: a row attending n keys has a bound ≈ λu·sqrt(e/n)·|o| + half an ulp, so a
    1 % error is caught on rows with a few hundred keys or more, not on the first rows.

    Backward: :func:`_attention_backward`; gradients accumulated block by block in the dtype
    (``grad_blocks``, g > 1): :func:`_block_roundings`.

    Outside the model: a kernel that rounds Q and K (or pre-scaled copies) to bf16 before the
    product (the math backend under ``allow_fp16_bf16_reduction_math_sdp(True)``) perturbs
    all scores of a row in a correlated way and may be flagged.
    """
    import torch
    g, n, d = q.shape
    q2 = q.reshape(g * n, d)
    f = _attention_forward(q2, k, v, dtype=dtype, lam=lam)
    out = {"o": (f["o"].reshape(g, n, d), f["tol_o"].reshape(g, n, d))}
    if dout is not None:
        do2 = dout.reshape(g * n, d)
        grads = _attention_backward(q2, k, v, do2, f, dtype=dtype, lam=lam)
        dq, dk, dv = _block_roundings(*grads, g, grad_blocks or (n, n), dtype)
        out.update(dq=(dq[0].reshape(g, n, d), dq[1].reshape(g, n, d)), dk=dk, dv=dv)
    assert all(t.dtype == torch.float64 for pair in out.values() for t in pair)
    return out


def _attention_forward(q, k, v, *, dtype: str, lam: float) -> dict:
    """Scores, P, the score error bounds and o's tolerance (:func:`attention_tolerances`)."""
    import torch
    n, d = k.shape
    u, u_in, u_acc = rounding_unit(dtype), input_roundoff(dtype), accumulation_roundoff(dtype)
    scale = d ** -0.5
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1).repeat(q.shape[0] // n, 1)
    s = (q @ k.T * scale).masked_fill(future, -math.inf)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    s = s.masked_fill(future, 0.0)
    qk = q.abs() @ k.abs().T * scale
    e = 2 * u * s.abs() + gamma_tilde(d, u_acc, lam) * qk + FP32_OPS * u_acc * (s.abs() + lse.abs() + 1)
    e_det = e * e + 2 * u_in * qk  # second order, and TF32 rounding of Q and K (shared by a row)
    u_p = u + 2 * u_in  # P rounded to the dtype (and P, V again inside a TF32 engine)
    o = p @ v
    p2, vv = p * p, v * v
    w = p2 * e * e
    var = w @ vv - 2 * o * (w @ v) + o * o * w.sum(-1, keepdim=True)  # Σ_j p²e²(v_j − o)²
    var = var + u_p ** 2 * (2 * (p2 @ vv) - 2 * o * (p2 @ v) + o * o * p2.sum(-1, keepdim=True))
    pe = p * e_det
    det = pe @ v.abs() + o.abs() * pe.sum(-1, keepdim=True)
    acc = gamma_tilde(n, u_acc, lam) * (p @ v.abs() + o.abs())
    err = (1 + 2 * u) * lam * var.clamp(min=0).sqrt() + det + acc
    return {"s": s, "p": p, "e": e, "e_det": e_det, "u_p": u_p, "o": o, "tol_o": rounded(o, err, dtype)}


def _attention_backward(q, k, v, do, f: dict, *, dtype: str, lam: float):
    """(ref, tol, Σ|terms|) of dQ, dK, dV (:func:`attention_tolerances`); f from the forward.

    Backward (dP = dO·Vᵀ, D_i = dO_i·o_i, dS = P∘(dP − D), dQ = scale·dS·K,
    dK = scale·dSᵀ·Q, dV = Pᵀ·dO). dV_jc = Σ_i p_ij dO_ic has the P errors of the forward;
    expanding Σ_k p_ik ε_ik gives, per independent variable, coefficient p_ij dO_ic for η_ij
    and dO_ic p_ik(δ_jk − p_ij) for ε_ik: Hoeffding over all of them. With dO positive dV
    does not cancel and a 1 % error is caught on keys that many queries attend. dQ and dK
    are cancelling sums (Σ_j dS_ij = 0): per (i, j), dS is off by at most
    a_ij = p_ij[(e_ij + u)|dP_ij − D_i| + b_ij] + 2u|dS_ij| (b_ij: dP's rounding and
    accumulation; 2u: dS rounded and scaled in the dtype), independent over j (dQ) or i (dK):
    Hoeffding; per row, the shared parts (Σ_k p_ik ε_ik, bounded by λ·sqrt(Σ_k p²e²), and
    the error g_i of D_i, from the rounded forward output (flash) or from Σ_j p̂ dP̂ (explicit),
    both added) enter dQ_i as ε̄_i·dQ_i + g_i·scale·(P·K)_i, and dK_j through a sum over
    rows, independent from row to row: Hoeffding again. These bounds are 30–70 % of |dQ|,
    |dK| (medians at s = 256 … 2,048; λ = 10 over sums that cancel): they catch NaN, zeros
    (on 60–85 % of the elements) and large errors, not 1 %.
    """
    import torch
    p, e, e_det, u_p, o = f["p"], f["e"], f["e_det"], f["u_p"], f["o"]
    nq, (n, d) = q.shape[0], k.shape
    u, u_in, u_acc = rounding_unit(dtype), input_roundoff(dtype), accumulation_roundoff(dtype)
    scale = d ** -0.5
    dp = do @ v.T
    dvec = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - dvec)
    dq, dk, dv = ds @ k * scale, ds.T @ q * scale, p.T @ do
    p2, ee = p * p, e * e
    e2 = (p2 * ee).sum(-1, keepdim=True)  # Σ_k p_ik² e_ik²: variance of the shared Σ_k p ε
    ebar_det = (p * e_det).sum(-1, keepdim=True)
    ebar = lam * e2.sqrt() + ebar_det  # bound of the row-shared Σ_k p_ik ε_ik
    # dV: Hoeffding over η_ij and every ε_ik; deterministic parts of P's error
    a_v = p2 * (u_p ** 2 + ee * (1 - p) ** 2 + e2 - p2 * ee)
    det_v = (p * (e_det + ebar_det)).T @ do.abs()
    acc_v = gamma_tilde(nq, u_acc, lam) * (p.T @ do.abs())
    tol_dv = rounded(dv, (1 + 2 * u) * lam * (a_v.T @ (do * do)).clamp(min=0).sqrt() + det_v + acc_v, dtype)
    # dS per (i, j): independent part a, deterministic part, and the shared row errors
    b = u * dp.abs() + (gamma_tilde(d, u_acc, lam) + 2 * u_in) * (do.abs() @ v.abs().T)
    diff = (dp - dvec).abs()
    a = p * ((e + u_p) * diff + b) + 2 * u * ds.abs()
    det_s = p * e_det * diff
    gbar = _d_error(f, b, dp, dvec, do, ebar, do.abs() @ v.abs().T, dtype=dtype, lam=lam)
    hq = lam * ((a * a) @ (k * k) + (2 * u_in) ** 2 * ((ds * ds) @ (k * k))).sqrt()
    rq = ebar * dq.abs() / scale + gbar * (p @ k).abs() + det_s @ k.abs()
    tol_dq = rounded(dq, scale * ((1 + 2 * u) * hq + rq + gamma_tilde(n, u_acc, lam) * (ds.abs() @ k.abs())), dtype)
    hk = lam * ((a * a).T @ (q * q) + (2 * u_in) ** 2 * ((ds * ds).T @ (q * q))).sqrt()
    shared = p * (ebar * diff + gbar)  # the row-shared errors, independent from row to row
    rk = torch.minimum(lam * ((shared ** 2).T @ (q * q)).sqrt(), shared.T @ q.abs()) + det_s.T @ q.abs()
    tol_dk = rounded(dk, scale * ((1 + 2 * u) * hk + rk + gamma_tilde(nq, u_acc, lam) * (ds.abs().T @ q.abs())), dtype)
    mags = scale * (ds.abs() @ k.abs()), scale * (ds.abs().T @ q.abs()), p.T @ do.abs()  # Σ|terms|
    return (dq, tol_dq, mags[0]), (dk, tol_dk, mags[1]), (dv, tol_dv, mags[2])


def _d_error(f: dict, b, dp, dvec, do, ebar, absdp, *, dtype: str, lam: float):
    """Bound of the error of D_i = dO_i·o_i as either kind of kernel forms it: from the stored
    forward output (flash: dO_i·Δo_i = Σ_j p_ij ε_ij (dP_ij − D_i) + Σ_j p_ij η_ij dP_ij, plus
    o's accumulation and rounding) or as Σ_j p̂_ij dP̂_ij (explicit: Σ_j p_ij(ε_ij + η_ij)dP_ij
    + p_ij β_ij − ε̄_i D_i). Hoeffding over j with coefficients that cover both, then the rest;
    absdp = |dO|·|V|ᵀ."""
    p, e, e_det, u_p, o = f["p"], f["e"], f["e_det"], f["u_p"], f["o"]
    n, d, u_acc = p.shape[1], do.shape[1], accumulation_roundoff(dtype)
    coef = p * ((e + u_p) * (dp.abs() + (dp - dvec).abs()) + b)
    rounding = (do.abs() * half_ulp(o.abs() + f["tol_o"], dtype)).sum(-1, keepdim=True)
    det = (p * (e_det * (dp.abs() + dvec.abs()) + gamma_tilde(n, u_acc, lam) * absdp)).sum(-1, keepdim=True)
    return lam * (coef ** 2).sum(-1, keepdim=True).sqrt() + ebar * dvec.abs() + rounding + det + \
        gamma_tilde(n + d, u_acc, lam) * (do * o).abs().sum(-1, keepdim=True)


def _block_roundings(dq, dk, dv, g: int, blocks: tuple[int, int], dtype: str):
    """Add the extra roundings of gradients accumulated in the dtype; returns (ref, tol) pairs.

    With g > 1 query heads per KV head, dK and dV are summed over the group (one more
    rounding, and one per head before it). ``grad_blocks`` (query block, key block): a kernel
    that adds each block's product into the gradient held in the dtype (PyTorch's CPU flash
    backward, FlashAttentionKernel.cpp: blocks of 32/64/256 queries by sequence length and
    512 keys) rounds a gradient element once per block: dV_j and dK_j once per query block at
    or after j (per query head), dQ_i once per key block its query block visits. Each such
    rounding is at most half an ulp of Σ|terms| (|dV| itself when the terms are positive),
    added deterministically: a 1 % error of dV is then visible only where few blocks were
    added (keys of the last query blocks); a correct fused dV at s = 2,048 may be 1.5 % off.
    """
    import torch
    qs, ks = blocks
    n = dk[0].shape[0]
    n_qblocks = -(-n // qs)
    idx = torch.arange(n, device=dk[0].device)
    per_key = n_qblocks - idx // qs  # query blocks that reach key j
    extra_kv = (g * per_key - (1 if g == 1 else 0)).to(torch.float64)[:, None]
    visited = ((idx // qs + 1) * qs).clamp(max=n)  # keys a query's block reaches
    extra_q = ((-(-visited // ks)) - 1).to(torch.float64).repeat(g)[:, None]

    def more(pair, extra):
        ref, tol, mag = pair
        return ref, tol + extra * half_ulp(mag + tol, dtype)
    return more(dq, extra_q), more(dk, extra_kv), more(dv, extra_kv)


# -- layer ops ------------------------------------------------------------------------------

def layer_op_tolerance(op: str, phase: str, ref, *, x, params: dict, grad=None, dtype: str,
                       norm: str = "rmsnorm"):
    """Per-element tolerance of a layer-ops probe result (float64 operands as the probe stored
    them: ``x`` the input, ``params`` its other operands, ``grad`` dy of a backward).

    PyTorch's CPU kernels (and the GPU ones) compute each op in fp32 and round the result once
    to the dtype — checked against float64 over seeds (tests/test_checks.py) — except where the
    probe's expression has several rounded steps, or as noted. Each bound is the fp32 error
    (FP32_OPS roundings, and γ̃_n for a sum over a row of n, on the magnitude of the terms)
    plus every rounding to the dtype (half an ulp each); in bf16 the half ulps dominate, so
    a result scaled by 0.99 is caught on most elements that are not a cancelling sum.

    * norm, final_norm forward (RMSNorm, LayerNorm): one rounding after fp32 statistics.
    * norm backward: RMSNorm one rounding. LayerNorm on the CPU with its weight in the dtype
      keeps mean and rstd *in the dtype* (layer_norm_kernel.cpp) and forms dX = a·γ·dy + b·x + c
      from them: the roundings of rstd and the mean, propagated through a, b and c, are added.
    * rotary, both phases: x·cos and rot(x)·sin (dy·cos and rot⁻¹(dy·sin)) rounded, then their
      sum: three roundings. The probe gives both terms one sign (per half), so they never cancel.
    * swiglu: silu(a) rounded, times b rounded; backward dy·b rounded, times silu'(a), rounded,
      and dy times the stored silu(a), rounded. gelu (tanh) and its backward, residual_add,
      attention_dropout (x·mask·(1/0.9) with a stored keep-mask): one rounding.
    * softmax: one rounding; backward: one rounding of p̂(dy − Σ p̂·dy) from the stored forward
      output p̂ (``params["out"]``), which every softmax backward reads (ref from it too).
    * embedding: a copy, exact (tolerance 0).
    * cross_entropy's logit gradient p − onehot, p = exp(ls): see :func:`_cross_entropy_tolerance`.
    """
    import torch
    u_acc = accumulation_roundoff(dtype)
    if op == "embedding":
        return torch.zeros_like(ref)
    if op == "rotary":
        a, b = _rotary_terms(grad if phase == "bwd" else x, params, backward=phase == "bwd")
        return rounded(ref, half_ulp(a, dtype) + half_ulp(b, dtype) + u_acc * (a.abs() + b.abs()), dtype)
    if op == "swiglu":
        return _swiglu_tolerance(phase, ref, x, grad, dtype)
    if op in ("norm", "final_norm"):
        err = _norm_error(phase, x, params, grad, dtype, layernorm=norm == "layernorm")
        return rounded(ref, err, dtype)
    if op == "cross_entropy":
        return _cross_entropy_tolerance(ref, x, dtype)
    if op == "softmax":
        p = params["out"] if phase == "bwd" else ref
        mag = p.abs() * (grad.abs() + (p.abs() * grad.abs()).sum(-1, keepdim=True)) if phase == "bwd" else p
        return rounded(ref, (FP32_OPS * u_acc + gamma_tilde(ref.shape[-1], u_acc)) * mag, dtype)
    if op == "gelu":  # |gelu'| ≤ 1 + |x|(1 + 0.135x²): 0.5(1 + t) + 0.5x(1 − t²)·√(2/π)(1 + 3·0.044715x²)
        mag = x.abs() + ref.abs() if phase == "fwd" else grad.abs() * (1 + x.abs() * (1 + 0.135 * x * x))
        return rounded(ref, FP32_OPS * u_acc * mag, dtype)
    assert op in ("residual_add", "attention_dropout"), op
    return rounded(ref, FP32_OPS * u_acc * ref.abs(), dtype)


def _cross_entropy_tolerance(ref, x, dtype: str):
    """p − onehot from a log_softmax ls = (x − m) − L stored in the dtype, m = max x,
    L = log S, S = Σ_k exp(x_k − m). PyTorch's CPU kernel for bf16 (LogSoftmaxKernelImpl.h)
    does every step in the dtype: x − m, each exp, the *sum* S, log S, the difference, each
    rounded. A sum of n terms accumulated in bf16 has no useful bound in general (n·u ≫ 1 at
    n = 2,688), but the largest term is exp(0) = 1, and rounding to nearest moves a sum by at
    most its smaller operand: every addition on the chain through that 1 loses at most a
    partial sum of the others, every other addition at most u times one, so
    |ΔS| ≤ (1 + (n + 1)u)²·R with R = S − 1 (first order in u; the exps' roundings included),
    and storing S costs min(half_ulp(S), R + |ΔS|). Then
    |Δls| ≤ half_ulp(x − m) + |ΔS|/(S − |ΔS|) + half_ulp(L) + half_ulp(ls) (+ fp32), and
    exp(ls) is off by p·expm1(|Δls|). The probe's check data give each row one non-target
    logit 30 above the rest (R ≈ 1e-9), so L is exact to first order; p ≈ 1e-13 elsewhere
    carries half_ulp(x − m) ≈ 6 %, so a 1 % error shows on that hot logit (p ≈ 1) and the
    target (p − 1 ≈ −1): two elements per row."""
    import torch
    n, u, u_acc = x.shape[-1], rounding_unit(dtype), accumulation_roundoff(dtype)
    m = x.amax(-1, keepdim=True)
    s = (x - m).exp().sum(-1, keepdim=True)
    rest = s - 1
    ds = (1 + (n + 1) * u) ** 2 * rest + FP32_OPS * u_acc * s
    ds = ds + torch.minimum(half_ulp(s + ds, dtype), rest + ds)
    big_l = s.log()
    dl = torch.where(ds < s, ds / (s - ds).clamp(min=1e-300), math.inf) + half_ulp(big_l, dtype)
    ls = x - m - big_l
    dls = half_ulp(x - m, dtype) + dl + half_ulp(ls, dtype) + FP32_OPS * u_acc * (x.abs() + m.abs() + 1)
    return rounded(ref, ls.exp() * dls.expm1() + FP32_OPS * u_acc * ls.exp(), dtype)


def _rotary_terms(z, params: dict, *, backward: bool):
    """The two rounded products of x·cos + cat(−x2, x1)·sin, or of the backward
    dy·cos + cat((dy·sin)2, −(dy·sin)1)."""
    import torch
    h = z.shape[-1] // 2
    if backward:
        w = z * params["sin"]
        return z * params["cos"], torch.cat((w[..., h:], -w[..., :h]), -1)
    return z * params["cos"], torch.cat((-z[..., h:], z[..., :h]), -1) * params["sin"]


def _swiglu_tolerance(phase: str, ref, x, grad, dtype: str):
    import torch
    u_acc = accumulation_roundoff(dtype)
    a, b = x[:, 0], x[:, 1]
    sig = torch.sigmoid(a)
    s = a * sig
    hs = half_ulp(s, dtype) + FP32_OPS * u_acc * s.abs()  # silu(a) as stored in the dtype
    if phase == "fwd":
        return rounded(ref, b.abs() * hs, dtype)
    t = grad * b  # dy·b, rounded before silu's backward multiplies it by silu'(a) in fp32
    dsilu_mag = sig * (1 + a.abs() * (1 - sig))
    err_a = half_ulp(t, dtype) * dsilu_mag + FP32_OPS * u_acc * t.abs() * dsilu_mag
    return torch.stack((rounded(ref[:, 0], err_a, dtype), rounded(ref[:, 1], grad.abs() * hs, dtype)), 1)


def _norm_error(phase: str, x, params: dict, grad, dtype: str, *, layernorm: bool):
    """fp32 error of a norm (forward) or of its input gradient, before the output rounding;
    for the LayerNorm backward also the statistics' roundings to the dtype."""
    n, u_acc = x.shape[-1], accumulation_roundoff(dtype)
    fp32 = FP32_OPS * u_acc + gamma_tilde(n, u_acc)
    w = params["w"]
    mu = x.mean(-1, keepdim=True) if layernorm else 0 * x[..., :1]
    xc = x - mu
    r = ((xc * xc).mean(-1, keepdim=True) + 1e-5).rsqrt()
    cond = (x * x).mean(-1, keepdim=True) * r * r  # the variance's own conditioning
    if phase == "fwd":
        return fp32 * ((x.abs() + mu.abs() + x.abs().mean(-1, keepdim=True)) * r * w.abs() * cond
                       + (params["b"].abs() if layernorm else 0))
    g = grad * w
    sg, sgx = g.abs().sum(-1, keepdim=True), (g * x).abs().sum(-1, keepdim=True)
    err = fp32 * cond * (r * g.abs() + r ** 3 / n * (sgx + mu.abs() * sg) * xc.abs() + r * sg / n)
    if not layernorm:
        return err
    ha, hm = half_ulp(r, dtype), half_ulp(mu, dtype)  # rstd and mean held in the dtype
    db, ds = g.sum(-1, keepdim=True), (g * x).sum(-1, keepdim=True)
    b = (db * mu - ds) * r ** 3 / n
    return err + ha * g.abs() + (3.1 * ha / r * b.abs() + hm * db.abs() * r ** 3 / n) * xc.abs() \
        + hm * b.abs() + ha * db.abs() / n


def adamw_tolerance(p0, ref, *, lr: float, dtype: str, g_l2=None, eps: float = 1e-8):
    """(master, weight) tolerances after one AdamW step from zero state, where
    p ← p(1 − lr·wd) − lr·g/(|g| + ε): the fp32 step makes ≈ 2 roundings on p(1 − lr·wd) and
    ≈ 8 on the update (m, v, bias corrections, sqrt, ε, the division; each relative u_acc),
    bounded with a factor 2 to spare, plus the final rounding; the weight is the master rounded
    to the dtype. A master scaled by 0.99 is caught wherever |p| ≫ 2^-24·(|p| + lr). L2 decay
    (``g_l2`` = (g, wd·p)): g + wd·p's rounding δ moves the update by lr·δ·ε/(|g'| + ε)², ≤ 2·lr."""
    u_acc, (g, wd_p) = accumulation_roundoff("fp32"), g_l2 if g_l2 is not None else (0 * p0, 0 * p0)
    l2 = 2 * lr * 4 * u_acc * (g.abs() + wd_p.abs()) * eps / ((g + wd_p).abs() + eps) ** 2
    master = rounded(ref, 4 * u_acc * p0.abs() + 16 * u_acc * lr + l2.clamp(max=2 * lr), "fp32")
    return master, rounded(ref, master, dtype)
