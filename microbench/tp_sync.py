"""TP-sync probe: what a tensor-parallel reduction costs inside a layer's back-to-back work,
beyond the same reduction after a barrier (the allreduce probe's price).

    python -m microbench.tp_sync --model mds-cpu --tp 2 --ranks 2

Why: Megatron's TP layers reduce [mbs·s, d] four times per layer and micro-batch (2 forward,
2 backward), and each reduction waits for the last rank of the group to arrive. The
allreduce probe times the reduction after a barrier, where every rank arrives at once; in a
step the ranks arrive as their own work between two reductions ends, and the reduction also
meets caches and buffers the layer's work left behind. Measured at the run's shapes
(tp2, mds-cpu, 2 CPU ranks): the in-step call is several times the idle one.

The case runs the rank's TP shard of ``layers`` layers (the stage's), forward and backward,
in Megatron-DeepSpeed's op order (RMSNorm as pow·mean·rsqrt, fused QKV split by views, rotary
left out, unfused attention with the ×layer scale and the in-place causal mask, SwiGLU,
row-parallel reduction of the output forward, column-parallel reduction of the input
gradient backward), with no barrier between layers. Every reduction inside is timed on its
own (``allreduce_in_step_us``); before each iteration, untimed, the same reduction after a
barrier (``allreduce_alone_us``). ``sync_us`` = their difference, mean over the group's ranks,
per reduction: the term the predictor adds to every TP reduction (``TpSync`` in the workload).
Bounded by the ranks' arrival skew and the reduction's memory traffic, not by the link.
Check: after the chain every rank of a TP group must hold the same activation (they are
reduced), finite; elements that differ from the group's first rank are wrong.
"""
from __future__ import annotations

import time
from typing import Any

from microbench.harness.compute import ComputeProbe, Work, randn
from microbench.harness.contract import Case, Context, Skip
from microbench.harness.engine import main_for
from microbench.model.workload import workload


def sync_shape(cfg) -> dict[str, Any]:
    """The workload's TP reduction and the rank's shard it follows (heads, FFN per rank)."""
    w, m, p = workload(cfg), cfg.model, cfg.parallel
    syncs = [s for s in w.syncs if s.phase == "fwd"]
    if not syncs:
        raise ValueError(f"tp {p.tp}: no tensor-parallel reduction to measure (needs tp > 1)")
    if p.sequence_parallel:
        raise ValueError("--sequence-parallel: the probe measures the TP allreduce; sequence parallelism's "
                         "reduce-scatter and all-gather are not measured by it")
    return {"op": "tp_sync", "phase": "fwd+bwd", "elements": syncs[0].elements, "group_size": p.tp,
            "num_reductions": 4 * cfg.layers_per_stage, "layers": cfg.layers_per_stage, "seq": m.seq_len,
            "batch": p.micro_batch, "hidden": m.hidden, "heads": m.num_heads // p.tp,
            "head_dim": m.head_dim, "ffn": m.ffn_hidden // p.tp, "gated": m.gated_mlp}


def _functions(group, times: list):
    import torch
    import torch.distributed as dist

    def reduce(x):
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        times.append(time.perf_counter() - t0)
        return x

    class ReduceFwd(torch.autograd.Function):  # Megatron's reduce_from_tensor_model_parallel_region
        @staticmethod
        def forward(ctx, x): return reduce(x)
        @staticmethod
        def backward(ctx, g): return g

    class ReduceBwd(torch.autograd.Function):  # copy_to_tensor_model_parallel_region
        @staticmethod
        def forward(ctx, x): return x
        @staticmethod
        def backward(ctx, g): return reduce(g.contiguous())
    return ReduceFwd.apply, ReduceBwd.apply


def _layer(x, w, f: dict[str, Any], number: int, mask, fns):
    import torch
    import torch.nn.functional as F
    red_fwd, red_bwd = fns
    s, b, hp, hd = f["seq"], f["batch"], f["heads"], f["head_dim"]

    def norm(t, g):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    qkv = red_bwd(norm(x, w["n1"])) @ w["qkv"].t()
    q, k, v = (t.reshape(s, b * hp, hd).transpose(0, 1) for t in qkv.view(s, b, hp, 3, hd).unbind(-2))
    sc = torch.baddbmm(torch.empty(b * hp, s, s, dtype=x.dtype), q, k.transpose(1, 2), beta=0.0,
                       alpha=1.0 / (hd ** 0.5 * number)).view(b, hp, s, s) * number
    sc.masked_fill_(mask, -10000.0)
    ctx = torch.bmm(torch.softmax(sc, -1).view(b * hp, s, s), v)
    x = x + red_fwd(ctx.view(b, hp, s, hd).permute(2, 0, 1, 3).contiguous().view(s, b, hp * hd) @ w["proj"].t())
    h = red_bwd(norm(x, w["n2"])) @ w["fc1"].t()
    a, g = h.chunk(2, -1) if f["gated"] else (h, None)
    h = F.silu(a) * g if f["gated"] else F.gelu(a)
    return x + red_fwd(h @ w["fc2"].t())


def tp_sync_work(ctx: Context, f: dict[str, Any], *, seed: int) -> Work:
    import torch
    import torch.distributed as dist
    world, tp = ctx.world.world_size, f["group_size"]
    if world % tp:
        raise Skip(f"world {world} is not a multiple of tp {tp}: no whole TP group")
    groups = [ctx.world.group(list(range(i, i + tp))) for i in range(0, world, tp)]  # every rank, every group
    mine = list(range(ctx.rank - ctx.rank % tp, ctx.rank - ctx.rank % tp + tp))
    group, dt, dev = groups[ctx.rank // tp], f["dtype"], ctx.device
    d, hp, hd, ffn, s, b = f["hidden"], f["heads"], f["head_dim"], f["ffn"], f["seq"], f["batch"]
    shapes = {"n1": (d,), "n2": (d,), "qkv": (3 * hp * hd, d), "proj": (d, hp * hd),
              "fc1": ((2 if f["gated"] else 1) * ffn, d), "fc2": (d, ffn)}
    weights = [{k: (randn(sh, seed=seed + 10 * i + j, dtype=dt, device=dev) * (1.0 if k[0] == "n" else 0.02))
                .requires_grad_() for j, (k, sh) in enumerate(shapes.items())} for i in range(f["layers"])]
    mask = torch.ones(1, 1, s, s, device=dev).tril() < 0.5
    x0 = randn((s, b, d), seed=seed + 999, dtype=dt, device=dev)  # the same input on every TP rank
    times: list[float] = []
    alone: list[float] = []
    fns = _functions(group, times)
    buf = randn((f["elements"],), seed=seed + 7, dtype=dt, device=dev)
    out: dict[str, Any] = {}

    def prepare() -> None:  # untimed: the same reduction after a barrier, as the allreduce probe
        for _ in range(2):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=group)
            alone.append(time.perf_counter() - t0)
        buf.div_(tp)

    def run() -> None:
        x = x0.clone().requires_grad_()
        y = x
        for i, w in enumerate(weights):
            y = _layer(y, w, f, max(1, i), mask, fns)
        y.sum().backward()
        out["y"] = y.detach()

    def check() -> tuple[int, int]:
        y = out["y"]
        ref = y.clone()
        dist.broadcast(ref, src=mine[0], group=group)
        return int((~torch.isfinite(y)).sum() + (y != ref).sum()), y.numel()
    return Work(run, check, prepare=prepare, result=lambda: [out["y"]], aux={"in_step": times, "alone": alone})


class TpSync(ComputeProbe):
    name = "tp_sync"
    module = "microbench.tp_sync"
    description = __doc__.splitlines()[0]
    columns = (("elements", "elements", ">9d"), ("n", "group_size", ">3d"), ("layers", "layers", ">6d"),
               ("time(us)", "time_us", ">11.1f"), ("in-step(us)", "allreduce_in_step_us", ">11.1f"),
               ("alone(us)", "allreduce_alone_us", ">10.1f"), ("sync(us)", "sync_us", ">9.1f"),
               ("#wrong", "num_wrong", ">6d"))

    def validate(self, args) -> None:
        super().validate(args)
        from microbench.harness.modelargs import config_from_args
        from microbench.runtime.errors import UsageError
        try:
            sync_shape(config_from_args(args, layout="world"))
        except ValueError as e:
            raise UsageError(str(e)) from None

    def peak_cases(self, ctx: Context):
        return ()

    def op_cases(self, ctx: Context):
        yield self.case(ctx, "tp_sync", kind="tp_sync", dtype=ctx.args.dtype, **sync_shape(ctx.cfg))

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        work = tp_sync_work(ctx, case.fields, seed=seed)
        case.fields["_aux"] = work.aux  # read back by metrics, on every rank
        return work

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        """Per reduction, after the warm-up iterations, mean over the world's ranks."""
        import torch
        import torch.distributed as dist
        aux, n, warm = case.fields.pop("_aux"), case.fields["num_reductions"], ctx.args.warmup
        in_step, alone = aux["in_step"][warm * n:], aux["alone"][warm * 2:]
        mine = torch.tensor([sum(in_step) / max(1, len(in_step)), sum(alone) / max(1, len(alone))],
                            dtype=torch.float64)
        dist.all_reduce(mine, group=ctx.world.control)
        step_us, alone_us = (float(v) * 1e6 / ctx.world.world_size for v in mine)
        return {"allreduce_in_step_us": step_us, "allreduce_alone_us": alone_us, "sync_us": step_us - alone_us}


if __name__ == "__main__":
    main_for(TpSync())
