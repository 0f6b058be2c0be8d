"""Layer-ops probe: the memory-bound tail of a layer and the optimizer step, in achieved GB/s.

    mpiexec -n 2 python -m microbench.layer_ops --model alcf-1t --tp 12 --scale 0.25

Every op here moves a few bytes per FLOP, so it is bounded by memory bandwidth: the figure is
GB/s = bytes_moved / t with bytes_moved from the workload (the minimum read + written; per op
in the workload), and its % of the measured copy bandwidth (a large device copy, measured first).
Ops and element counts come from the workload (norm, rotary, swiglu|gelu, residual_add,
softmax of the explicit attention path, and on the end stages embedding, final_norm,
cross_entropy over the vocab shard); the op's inner dimension is the model's (hidden,
head_dim·heads, ffn/tp, seq, vocab/tp) and ``--scale`` shrinks the row count only.
Backward runs autograd over a retained graph (residual_add's backward is the gradient sum at
the fork: the same add); cross_entropy is timed as loss plus logit gradient, as a fused
vocab-parallel kernel does in one pass. Check: the first 8 rows of each result against float64
within :func:`checks.layer_op_tolerance` (rotary's data have one sign per half, cross-entropy's
one dominant logit per row, so that what can be checked tightly does not cancel).

AdamW: fp32 master weights, m and v, fp32 gradients, the model-dtype weight written back
(``workload.adam_bytes_per_param``), over the rank's parameter shard (÷ dp under ZeRO-1).
A shard larger than ``--adam-max-params`` is measured on a chunk of that size and the step
time extrapolated linearly (``extrapolation``, ``time_us_step``): the op is a stream over
memory. In a step the optimizer runs after the whole backward has evicted its state, so
every iteration starts cold: a 256 MiB buffer is written before it, untimed
(``cold_cache``) — without that a small shard is timed from cache, several times too fast.

copy_fresh: where the step's gradient sync copies into buffers it allocates for the copy
(DeepSpeed's flatten and buckets, ``vocabulary.FRESH_COPY``), the copy into a new buffer at
each of those sizes, the previous one freed — on a CPU the allocator gives large buffers back
to the kernel and each page faults on its first touch; a device's caching allocator reuses
its blocks. Sizes above 2^26 elements (CPU) or 2^28 (GPU) are measured at that size and
priced from the fit. Check: the copy equals its source exactly.
"""
from __future__ import annotations

import argparse
from typing import Any

from microbench.harness.checks import adamw_tolerance, count_outside, layer_op_tolerance
from microbench.harness.compute import ComputeProbe, Work, copy_peak_case, randn, scale_dim
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.harness.modelargs import config_from_args
from microbench.model.config import dtype_bytes
from microbench.model.workload import FRESH_COPY, adam_bytes_per_param, workload
from microbench.runtime.errors import UsageError

FLUSH_BYTES = 256 << 20  # > 2× the largest last-level caches (H100 L2 50 MB, EPYC L3 ≤ 128 MB per CCD group)
LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.95), 1e-8, 0.1  # Megatron's usual AdamW settings


def memop_shapes(cfg, *, scale: float = 1.0) -> list[dict[str, Any]]:
    """Every memory-bound op of the workload (one row each for fwd/bwd), rows scaled."""
    w, out, seen = workload(cfg), [], set()
    for op in w.memops + w.head_memops:
        if op.phase == "recompute" or (op.name, op.phase) in seen:  # a recompute repeats the forward
            continue
        seen.add((op.name, op.phase))
        inner = op.inner
        rows = op.elements // inner
        assert rows * inner == op.elements and op.bytes % rows == 0, (op, inner)
        rows_s = scale_dim(rows, scale, f"{op.name} rows", multiple=8)
        out.append({"op": op.name, "phase": op.phase, "rows": rows_s, "inner": inner,
                    "elements": rows_s * inner, "bytes_moved": op.bytes // rows * rows_s,
                    "dtype": op.dtype, "count": op.count,
                    "explicit_attention_only": op.explicit_attention_only})
    return out


FRESH_MAX_ELEMENTS = {"cpu": 1 << 26, "device": 1 << 28}


def fresh_copy_shapes(cfg, *, device_kind: str) -> list[dict[str, Any]]:
    """One case per size of the step's copies into new buffers (:data:`vocabulary.FRESH_COPY`)."""
    w, cap = workload(cfg), FRESH_MAX_ELEMENTS["cpu" if device_kind == "cpu" else "device"]
    sizes = sorted({(op.elements, op.dtype) for op in w.step if getattr(op, "name", "") == FRESH_COPY}, reverse=True)
    return [{"op": FRESH_COPY, "phase": "step", "elements": min(n, cap), "step_elements": n,
             "bytes_moved": 2 * min(n, cap) * dtype_bytes(dt), "dtype": dt} for n, dt in sizes]


def fresh_copy_work(f: dict[str, Any], *, seed: int, device) -> Work:
    import torch
    src = randn((f["elements"],), seed=seed, dtype=f["dtype"], device=device)
    result: dict[str, Any] = {}

    def run() -> None:  # the previous buffer is freed when this one replaces it, as a framework's is
        result["out"] = torch.empty_like(src).copy_(src)

    def check() -> tuple[int, int]:
        return int((~(result["out"] == src)).sum().item()), f["elements"]  # NaN ≠ NaN: wrong
    return Work(run, check, result=lambda: [result["out"]])


ADAM = ("fused", "torch")
"""``fused``: torch's fused AdamW (foreach where the device has no fused kernel) over one flat
buffer, as the reference step runs it; ``torch``: ``torch.optim.Adam`` with L2 weight decay in
torch's default implementation for the device (one tensor at a time on a CPU), which is what
Megatron-DeepSpeed's ``--optimizer adam`` builds without ``--ds-fused-adam``
(``megatron/optimizer/__init__.py``) and DeepSpeed's ZeRO-1/2 step calls on each partition."""


def adamw_shape(cfg, *, scale: float = 1.0, max_params: int, adam: str = "fused") -> dict[str, Any]:
    w = workload(cfg)
    params = scale_dim(w.optimizer_params, scale, "optimizer params")
    measured = min(params, max_params)
    per = adam_bytes_per_param(cfg.model.dtype)
    return {"op": "adamw", "phase": "step", "params": params, "measured_params": measured, "elements": measured,
            "extrapolation": params / measured, "bytes_moved": measured * per,
            "bytes_step": params * per, "dtype": cfg.model.dtype,
            "zero_stage": cfg.parallel.zero_stage, "dp_size": cfg.parallel.dp, "adam": adam,
            "cold_cache": True}  # a step's optimizer runs after the backward has evicted its state


def _op_fn(cfg_f: dict[str, Any], name: str, params: dict[str, Any]):
    import torch
    import torch.nn.functional as F
    inner = cfg_f["inner"]
    if name in ("norm", "final_norm"):
        if cfg_f["norm"] == "layernorm":
            return lambda x: F.layer_norm(x, (inner,), params["w"].to(x.dtype), params["b"].to(x.dtype))
        return lambda x: F.rms_norm(x, (inner,), params["w"].to(x.dtype), eps=1e-5)
    if name == "rotary":
        def rotary(x):  # x [rows, heads, head_dim]; cos/sin broadcast over heads
            x1, x2 = x.chunk(2, dim=-1)
            return x * params["cos"].to(x.dtype) + torch.cat((-x2, x1), dim=-1) * params["sin"].to(x.dtype)
        return rotary
    if name == "swiglu":
        return lambda x: F.silu(x[:, 0]) * x[:, 1]
    if name == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "residual_add":
        return lambda x: x + params["y"].to(x.dtype)
    if name == "softmax":
        return lambda x: torch.softmax(x, dim=-1)
    if name == "attention_dropout":  # apply a stored keep-mask (p = 0.1) so the check is exact
        return lambda x: x * params["mask"].to(x.dtype) * (1 / 0.9)
    if name == "embedding":
        return lambda table: F.embedding(params["ids"], table)
    if name == "cross_entropy":
        return lambda x: F.cross_entropy(x, params["target"], reduction="sum")
    raise AssertionError(name)


def memop_work(f: dict[str, Any], *, seed: int, device) -> Work:
    import torch
    name, rows, inner, dt = f["op"], f["rows"], f["inner"], f["dtype"]
    shape = {"swiglu": (rows, 2, inner), "rotary": (rows, inner // f["head_dim"], f["head_dim"]),
             "embedding": (f["vocab_shard"], inner)}.get(name, (rows, inner))
    g = torch.Generator().manual_seed(seed)
    signed = _one_sign_per_half if name == "rotary" else (lambda t: t)  # rotary's terms never cancel
    params = {"w": randn((inner,), seed=seed + 5, dtype=dt, device=device),
              "b": randn((inner,), seed=seed + 6, dtype=dt, device=device),
              "cos": randn((rows, 1, f["head_dim"]), seed=seed + 7, dtype=dt, device=device).abs(),
              "sin": _one_sign_per_half(randn((rows, 1, f["head_dim"]), seed=seed + 8, dtype=dt, device=device)),
              "y": randn((rows, inner), seed=seed + 9, dtype=dt, device=device) if name == "residual_add" else None,
              "ids": torch.randint(0, shape[0], (rows,), generator=g).to(device),
              "target": torch.randint(0, inner, (rows,), generator=g).to(device),
              "mask": (torch.rand(shape, generator=g) >= 0.1).to(device) if name == "attention_dropout" else None}
    fn = _op_fn(f, name, params)
    bwd = f["phase"] == "bwd" or name == "cross_entropy"
    x = signed(randn(shape, seed=seed, dtype=dt, device=device))
    if name == "cross_entropy":  # one non-target logit per row leads by 30 (checks._cross_entropy_tolerance)
        x[torch.arange(rows, device=device), (params["target"] + 1) % inner] = 30.0
    x.requires_grad_(bwd and name != "residual_add")
    result: dict[str, Any] = {}
    out = grad = None
    if name == "residual_add" or not bwd:
        def run() -> None:
            with torch.no_grad():
                result["out"] = fn(x)
    elif name == "cross_entropy":  # loss and the logit gradient, a fresh graph each call
        def run() -> None:
            result["out"] = torch.autograd.grad(fn(x), x)[0]
    else:
        out = fn(x)
        grad = signed(randn(out.shape, seed=seed + 3, dtype=dt, device=device))

        def run() -> None:
            result["out"] = torch.autograd.grad(out, x, grad, retain_graph=True)[0]

    def check() -> tuple[int, int]:
        """The first 8 rows against float64, within :func:`layer_op_tolerance`."""
        r = min(rows, 8)
        p64 = {k: None if v is None else v if k in ("w", "b") else v[:r] for k, v in params.items()}
        p64 = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in p64.items()}
        if out is not None:
            p64["out"] = out[:r].detach().double()
        x64 = x[:r].detach().double()
        if name == "embedding":  # the table rows the first r ids gather, and ids renumbered
            x64, p64["ids"] = x[params["ids"][:r]].detach().double(), torch.arange(r, device=x.device)
        g64 = None if grad is None else grad[:r].double()
        ref = _reference(f, name, bwd, x64, p64, g64)
        tol = layer_op_tolerance(name, f["phase"], ref, x=x64, params=p64, grad=g64, dtype=dt, norm=f["norm"])
        got = result["out"][:r]
        return count_outside(got, ref, tol), got.numel()
    return Work(run, check, result=lambda: [result["out"]])


def _one_sign_per_half(t):
    """|t| with its last dimension's second half negated (rotary check data: x·cos and
    rot(x)·sin then have one sign per half, so their sum never cancels)."""
    import torch
    h = t.shape[-1] // 2
    sign = torch.cat((torch.ones(h), -torch.ones(t.shape[-1] - h))).to(t.dtype).to(t.device)
    return t.abs() * sign


def _reference(f: dict[str, Any], name: str, bwd: bool, x64, p64: dict, g64):
    """The op (or its input gradient) in float64 on the stored operands."""
    import torch
    if name == "softmax" and bwd:  # from the stored forward output, as every softmax backward
        p = p64["out"]
        return p * (g64 - (p * g64).sum(-1, keepdim=True))
    fn64 = _op_fn(f, name, p64)
    if name == "residual_add" or not bwd:
        return fn64(x64)
    xg = x64.clone().requires_grad_(True)
    return torch.autograd.grad(fn64(xg), xg, g64)[0]  # g64 None: cross_entropy's scalar loss


def adamw_work(f: dict[str, Any], *, seed: int, device) -> Work:
    import torch
    n = f["measured_params"]
    master = randn((n,), seed=seed, dtype="fp32", device=device).requires_grad_(True)
    master.grad = randn((n,), seed=seed + 1, dtype="fp32", device=device)
    weight = torch.empty(n, dtype=randn((1,), seed=0, dtype=f["dtype"], device="cpu").dtype, device=device)
    p0, g0 = master.detach()[:1024].double().clone(), master.grad[:1024].double().clone()
    l2 = f.get("adam") == "torch"
    if l2:  # torch's own choice of implementation, as a framework that passes no flag gets
        opt = torch.optim.Adam([master], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    else:
        try:
            opt = torch.optim.AdamW([master], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
        except RuntimeError:  # no fused kernel for this device: the multi-tensor path
            opt = torch.optim.AdamW([master], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=True)

    def run() -> None:
        opt.step()
        with torch.no_grad():
            weight.copy_(master)

    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def evict() -> None:  # untimed: write more than any L2/L3 holds, so the step starts cold
        flush.fill_(1)

    def check() -> tuple[int, int]:
        """After one step from zero state: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr·g/(|g| + ε);
        with L2 decay (``torch``) g ← g + wd·p first, and p ← p − lr·g/(|g| + ε)."""
        g = g0 + WEIGHT_DECAY * p0 if l2 else g0
        ref = (p0 if l2 else p0 * (1 - LR * WEIGHT_DECAY)) - LR * g / (g.abs() + EPS)
        k = ref.numel()
        tol_master, tol_weight = adamw_tolerance(p0, ref, lr=LR, dtype=f["dtype"], eps=EPS,
                                                 g_l2=(g0, WEIGHT_DECAY * p0) if l2 else None)
        wrong = count_outside(master.detach()[:k], ref, tol_master) + count_outside(weight[:k], ref, tol_weight)
        return wrong, 2 * k
    return Work(run, check, prepare=evict, result=lambda: [master.data, weight])


class LayerOps(ComputeProbe):
    name = "layer_ops"
    module = "microbench.layer_ops"
    description = __doc__.splitlines()[0]
    footer_metric = "gbps"
    columns = (("op", "op", ">13"), ("phase", "phase", ">5"), ("elements", "elements", ">11d"),
               ("bytes", "bytes_moved", ">12d"), ("type", "dtype", ">4"), ("time(us)", "time_us", ">11.1f"),
               ("GB/s", "gbps", ">9.2f"), ("%peak", "pct_peak", ">6.1f"), ("#wrong", "num_wrong", ">6d"))

    def add_args(self, p: argparse.ArgumentParser) -> None:
        super().add_args(p)
        p.add_argument("--adam-max-params", type=int, default=None,
                       help="largest AdamW chunk measured (default 2^28 on a GPU, 2^23 on a CPU)")
        p.add_argument("--adam", choices=ADAM, default="fused",
                       help="fused: torch's fused AdamW (the reference step's); torch: torch.optim.Adam as "
                            "torch chooses, what Megatron-DeepSpeed's --optimizer adam runs (default fused)")

    def validate(self, args) -> None:
        super().validate(args)
        if args.adam_max_params is not None and args.adam_max_params < 1:
            raise UsageError(f"--adam-max-params {args.adam_max_params}: must be ≥ 1")
        try:
            cfg = config_from_args(args, layout="world")
            memop_shapes(cfg, scale=args.scale)
            adamw_shape(cfg, scale=args.scale, max_params=1)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def peak_cases(self, ctx: Context):
        yield copy_peak_case(self, ctx)

    def op_cases(self, ctx: Context):
        m = ctx.cfg.model
        for s in memop_shapes(ctx.cfg, scale=ctx.args.scale):
            s.update(dtype=ctx.args.dtype, norm=m.norm, head_dim=m.head_dim,
                     vocab_shard=m.vocab_size // ctx.cfg.parallel.tp)
            yield self.case(ctx, f"{s['op']}-{s['phase']}", kind="memop", **s)
        for s in fresh_copy_shapes(ctx.cfg, device_kind=ctx.world.device_kind):
            yield self.case(ctx, f"{s['op']}-{s['step_elements']}", kind="memop", **s)
        cap = ctx.args.adam_max_params or (1 << 23 if ctx.world.device_kind == "cpu" else 1 << 28)
        yield self.case(ctx, "adamw-step", kind="memop", **adamw_shape(ctx.cfg, scale=ctx.args.scale,
                                                                       max_params=cap, adam=ctx.args.adam))

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        work = {"adamw": adamw_work, FRESH_COPY: fresh_copy_work}.get(case.fields["op"], memop_work)
        return work(case.fields, seed=seed, device=ctx.device)


if __name__ == "__main__":
    main_for(LayerOps())
