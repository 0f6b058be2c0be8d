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

from .compute import ComputeProbe, Work, count_not_close, randn, scale_dim
from .harness import Case, Context, layout_config, main_for
from .runtime import UsageError
from .workload import Attention, workload

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


def attention_work(f: dict[str, Any], *, seed: int, device) -> Work:
    import torch
    b, h, kv, s, d, dt = f["batch"], f["heads"], f["kv_heads"], f["seq"], f["head_dim"], f["dtype"]
    bwd = f["phase"] == "bwd"
    q = randn((b, h, s, d), seed=seed, dtype=dt, device=device, requires_grad=bwd)
    k = randn((b, kv, s, d), seed=seed + 1, dtype=dt, device=device, requires_grad=bwd)
    v = randn((b, kv, s, d), seed=seed + 2, dtype=dt, device=device, requires_grad=bwd)
    mask = causal_mask(s, device) if f["path"] == "explicit" else None
    result: dict[str, Any] = {}
    if bwd:
        out = attend(q, k, v, path=f["path"], mask=mask)
        grad = randn(out.shape, seed=seed + 3, dtype=dt, device=device)

        def run() -> None:
            result["grads"] = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    else:
        def run() -> None:
            with torch.no_grad():
                result["out"] = attend(q, k, v, path=f["path"], mask=mask)

    def check() -> tuple[int, int]:
        """Batch 0, query head 0 (and its KV head) against float64 on the explicit path."""
        rep = h // kv
        q64 = q[:1, :1].detach().double().requires_grad_(bwd)
        k64 = k[:1, :1].detach().double().requires_grad_(bwd)
        v64 = v[:1, :1].detach().double().requires_grad_(bwd)
        ref = attend(q64, k64, v64, path="explicit", mask=causal_mask(s, device))
        if not bwd:
            got = result["out"][:1, :1]
            return count_not_close(got, ref, dtype=dt, terms=s), got.numel()
        refs = torch.autograd.grad(ref, (q64, k64, v64), grad[:1, :1].double())
        dq, dk, dv = (g[:1, :1] for g in result["grads"])
        # KV head 0 also receives gradient from query heads 1..rep-1: compare dq only then.
        pairs = [(dq, refs[0])] + ([(dk, refs[1]), (dv, refs[2])] if rep == 1 else [])
        wrong = sum(count_not_close(g, r, dtype=dt, terms=s) for g, r in pairs)
        return wrong, sum(g.numel() for g, _ in pairs)
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
            attention_shapes(layout_config(args, world_size=None), scale=args.scale)
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
