"""Attention-core probe: softmax(Q·Kᵀ/√d)·V of the rank's heads, causal, forward and backward.

    mpiexec -n 2 python -m microbench.attention --model alcf-1t --tp 12 --scale 0.25

Two paths over the same (mbs, heads/tp, s, head_dim) from the workload: ``fused`` is
``scaled_dot_product_attention(is_causal=True)`` (flash or memory-efficient kernels where the
device has them: compute-bound, never writes the s×s scores), ``explicit`` is Q·Kᵀ, mask,
softmax and P·V as batched GEMMs (the s×s scores go through memory: often memory-bound).
Backward is timed alone (autograd over a retained graph: dQ, dK, dV).

FLOP convention (the workload's): full = 4·b·heads·s²·head_dim forward (Q·Kᵀ and P·V, 2·s²·d
each per head), backward 2× forward; ``tflops`` uses the full count (as Megatron's formula
and most papers do), ``tflops_causal`` the causal half a mask-aware kernel really computes.
``--scale F`` shrinks s (to a multiple of 8) and the head count; head_dim stays, since kernels
are specialised on it. Grouped KV heads are repeated to the query heads inside the timed call.
"""
from __future__ import annotations

import math
from typing import Any

from microbench.harness.checks import attention_tolerances, count_outside
from microbench.harness.compute import ComputeProbe, Work, randn, scale_dim, uniform
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.harness.modelargs import config_from_args
from microbench.model.workload import Attention, workload
from microbench.runtime.errors import UsageError

PATHS = ("fused", "explicit")


def attention_shapes(cfg, *, scale: float = 1.0) -> list[dict[str, Any]]:
    """The attention core of the workload (fwd, bwd; the recompute fwd repeats fwd), scaled."""
    out = []
    for a in workload(cfg).attention:
        if a.name != "attention_core":
            continue
        heads = scale_dim(a.heads, scale, "heads per rank")
        group = a.heads // a.kv_heads
        if heads % group:
            raise ValueError(f"--scale {scale:g}: heads {heads} not a multiple of the GQA group {group}")
        seq = scale_dim(a.seq, scale, "seq_len", multiple=8)
        s = Attention(a.phase, a.batch, heads, heads // group, seq, a.head_dim, a.dtype)
        out.append({"op": a.name, "phase": s.phase, "batch": s.batch, "heads": s.heads,
                    "kv_heads": s.kv_heads, "seq": s.seq, "head_dim": s.head_dim,
                    "dtype": s.dtype, "causal": s.causal, "flop": s.flop, "flop_causal": s.flop_causal})
    return out


def attend(q, k, v, *, path: str, mask=None):
    """One attention core; k, v with fewer heads are repeated to q's (GQA)."""
    import torch
    import torch.nn.functional as F
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if path == "fused":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def causal_mask(seq: int, device):
    import torch
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)


# PyTorch's CPU flash backward (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) adds each
# block's product into the gradients held in the dtype: blocks of 256/64/32 queries (by sequence
# length) and 512 keys. The check allows those roundings on the fused path, on every device.
def flash_grad_blocks(seq: int) -> tuple[int, int]:
    return (256 if seq >= 768 else 64 if seq >= 192 else 32), 512


def attention_work(f: dict[str, Any], *, seed: int, device) -> Work:
    """Check data, chosen so the checked outputs do not cancel (:func:`checks.attention_tolerances`):
    Q, K ~ N(0, 1/4) (scores of std 1/4: P spreads over every visible key); V ~ U[1, 2] in the
    forward (o has no cancellation), N(0, 1) in the backward, where dO ~ U[1, 2] (dV has none)."""
    import torch
    b, h, kv, s, d, dt = f["batch"], f["heads"], f["kv_heads"], f["seq"], f["head_dim"], f["dtype"]
    bwd = f["phase"] == "bwd"
    q = (randn((b, h, s, d), seed=seed, dtype=dt, device=device) * 0.5).requires_grad_(bwd)
    k = (randn((b, kv, s, d), seed=seed + 1, dtype=dt, device=device) * 0.5).requires_grad_(bwd)
    v = (randn if bwd else uniform)((b, kv, s, d), seed=seed + 2, dtype=dt, device=device, requires_grad=bwd)
    mask = causal_mask(s, device) if f["path"] == "explicit" else None
    result: dict[str, Any] = {}
    grad = None
    if bwd:
        out = attend(q, k, v, path=f["path"], mask=mask)
        grad = uniform(out.shape, seed=seed + 3, dtype=dt, device=device)

        def run() -> None:
            result["grads"] = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    else:
        def run() -> None:
            with torch.no_grad():
                result["out"] = attend(q, k, v, path=f["path"], mask=mask)

    def check() -> tuple[int, int]:
        """Batch 0, KV head 0 and the query heads that share it, against float64."""
        g = h // kv
        q64, k64, v64 = q[0, :g].detach().double(), k[0, 0].detach().double(), v[0, 0].detach().double()
        ref = attention_tolerances(q64, k64, v64, None if grad is None else grad[0, :g].double(), dtype=dt,
                                   grad_blocks=flash_grad_blocks(s) if f["path"] == "fused" else None)
        if bwd:
            dq, dk, dv = result["grads"]
            got = {"dq": dq[0, :g], "dk": dk[0, 0], "dv": dv[0, 0]}
        else:
            got = {"o": result["out"][0, :g]}
        wrong = sum(count_outside(t, *ref[name]) for name, t in got.items())
        return wrong, sum(t.numel() for t in got.values())
    return Work(run, check, result=lambda: [result["out"]] if "out" in result else list(result["grads"]))


class AttentionCore(ComputeProbe):
    name = "attention"
    module = "microbench.attention"
    description = __doc__.splitlines()[0]
    columns = (("path", "path", ">8"), ("phase", "phase", ">5"), ("b", "batch", ">3d"),
               ("heads", "heads", ">5d"), ("seq", "seq", ">6d"), ("hdim", "head_dim", ">4d"),
               ("type", "dtype", ">4"), ("time(us)", "time_us", ">11.1f"),
               ("TFLOP/s", "tflops", ">8.3f"), ("causal", "tflops_causal", ">8.3f"),
               ("%peak", "pct_peak", ">6.1f"), ("#wrong", "num_wrong", ">6d"))

    def validate(self, args) -> None:
        super().validate(args)
        try:
            attention_shapes(config_from_args(args, layout="world"), scale=args.scale)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def op_cases(self, ctx: Context):
        for shape in attention_shapes(ctx.cfg, scale=ctx.args.scale):
            shape["dtype"] = ctx.args.dtype
            for path in PATHS:
                yield self.case(ctx, f"attention-{path}-{shape['phase']}", kind="attention",
                                path=path, **shape)

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        return attention_work(case.fields, seed=seed, device=ctx.device)


if __name__ == "__main__":
    main_for(AttentionCore())
