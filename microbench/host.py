"""Host probe: the host's own time in one transformer layer of the preset, per phase.

    mpiexec -n 2 python -m microbench.host --model alcf-1t --tp 12
    python -m microbench.host --model tiny          # embedded 2-rank world, every rank at once

On a GPU or XPU the host (Python, autograd, the launch path of every kernel) runs ahead of
the device, so a layer costs about max(host, device); on a CPU the two add. This probe
measures the host's term: one layer of the preset (the workload's operations in Megatron's
order — norm, fused QKV, rotary, attention core, projection, residual, norm, FC1, SwiGLU or
GELU, FC2, residual, with the model's dropout) at :data:`~microbench.model.config.HOST_WIDTH`
(hidden 64, seq 64), a width at which every kernel is far shorter than the code around it,
so the device would idle if it were infinitely fast. Per phase as a step runs it: ``fwd``
(under ``no_grad`` with full recompute, as Megatron's checkpointed forward), ``recompute``
(the forward again, building the graph) and ``bwd`` (autograd over it); per attention path
(``fused``: SDPA; ``explicit``: Q·Kᵀ, mask, softmax, P·V).

Each case also times the phase's operations one by one at the same shapes (``ops_us``,
measured once beside the case with the same timer): ``host_us`` = the phase − its operations
is the host's own time, the same definition as the Megatron-DeepSpeed framework probe (its
narrowed run less the probes' price of its operations). On a GPU an operation timed alone
is its tiny kernel; on a CPU it is the operation's dispatch and arithmetic, which its own
probe already measures at full width. The check runs the layer in float64 and compares
(loose: this probe is about time; the operation probes check the arithmetic tightly).

With more than one rank, one more case, ``host-tp_call``: the host's time to issue one
tensor-parallel reduction of the narrowed activation through a Megatron-style autograd function
(``reduce_from_tensor_model_parallel_region``), read on the host clock around the call alone,
every rank of the group starting together (``host_us``, median). On a device that queues work
the call returns once the reduction is enqueued, so this is the host's share of a TP call
(``host.tp_call_us`` of a spec); on a CPU the call returns when the reduction is done, so it is
the whole collective, which the predictor prices from the collective probes instead. The check:
every rank of the group holds the same reduced values afterwards.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

from microbench.attention import attend, causal_mask
from microbench.harness.checks import count_outside, input_roundoff, rounding_unit
from microbench.harness.compute import ComputeProbe, Work, randn
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.harness.timing import Timer
from microbench.model.config import HOST_WIDTH, narrowed, with_layout

PATHS = ("fused", "explicit")
DROPOUT = 0.1  # Megatron's hidden and attention dropout where the model has it


def host_config(cfg):
    """One rank's layer at :data:`HOST_WIDTH`: the model's structure (norm, MLP, dropout, GQA,
    recompute), no tensor-parallel shard to keep (the width is tiny) and no collectives (a
    collective's call is priced with it: the α of its fit)."""
    return narrowed(with_layout(cfg, tp=1, pp=1, dp=1, global_batch=cfg.parallel.micro_batch))


def host_phases(cfg) -> tuple[str, ...]:
    return ("fwd", "recompute", "bwd") if cfg.parallel.recompute == "full" else ("fwd", "bwd")


class Layer:
    """One narrowed layer as plain tensor operations; ``call`` sees every operation."""

    def __init__(self, cfg, *, path: str, dtype: str, device, seed: int):
        m = cfg.model
        self.m, self.path, self.device = m, path, device
        d, kv, f = m.hidden, m.kv_hidden, m.ffn_hidden
        self.T = cfg.parallel.micro_batch * m.seq_len
        w = lambda shape, s: randn(shape, seed=seed + s, dtype=dtype, device=device) * 0.05  # noqa: E731
        self.weights = {"norm1": w((d,), 1) + 1, "norm2": w((d,), 2) + 1, "qkv": w((d + 2 * kv, d), 3),
                        "proj": w((d, d), 4), "fc1": w(((m.ffn_matrices - 1) * f, d), 5), "fc2": w((d, f), 6)}
        pos = randn((m.seq_len, 1, m.head_dim), seed=seed + 7, dtype=dtype, device=device)
        self.cos, self.sin = pos.cos(), pos.sin()
        self.mask = causal_mask(m.seq_len, device) if path == "explicit" else None

    def parameters(self) -> list:
        return list(self.weights.values())

    def forward(self, x, call: Callable[..., Any] = lambda name, fn, *a: fn(*a)):
        import torch
        import torch.nn.functional as F
        m, W, b = self.m, self.weights, self.T // self.m.seq_len
        norm = (lambda t, g: F.rms_norm(t, (m.hidden,), g, eps=1e-5)) if m.norm == "rmsnorm" else \
            (lambda t, g: F.layer_norm(t, (m.hidden,), g))
        h = call("norm", norm, x, W["norm1"])
        q, k, v = call("qkv", F.linear, h, W["qkv"]).split([m.hidden, m.kv_hidden, m.kv_hidden], dim=-1)
        q = call("rotary", self.rotary, q.reshape(m.seq_len, b * m.num_heads, m.head_dim))
        k = call("rotary", self.rotary, k.reshape(m.seq_len, b * m.num_kv_heads, m.head_dim))
        heads = lambda t, n: t.reshape(m.seq_len, b, n, m.head_dim).permute(1, 2, 0, 3)  # noqa: E731
        o = call("attention", self.attention, heads(q, m.num_heads), heads(k, m.num_kv_heads),
                 heads(v.reshape(m.seq_len * b, m.kv_hidden), m.num_kv_heads))
        y = call("attn_proj", F.linear, o.permute(2, 0, 1, 3).reshape(self.T, m.hidden), W["proj"])
        x = call("residual_add", torch.add, x, self.dropout(y, call))
        u = call("fc1", F.linear, call("norm", norm, x, W["norm2"]), W["fc1"])
        a = call("swiglu", lambda t: F.silu(t[:, :m.ffn_hidden]) * t[:, m.ffn_hidden:], u) if m.gated_mlp \
            else call("gelu", F.gelu, u)
        return call("residual_add", torch.add, x, self.dropout(call("fc2", F.linear, a, W["fc2"]), call))

    def rotary(self, t):
        import torch
        t1, t2 = t.chunk(2, dim=-1)
        return t * self.cos + torch.cat((-t2, t1), dim=-1) * self.sin

    def attention(self, q, k, v):
        return attend(q, k, v, path=self.path, mask=self.mask)

    def dropout(self, y, call):
        import torch.nn.functional as F
        return call("dropout", F.dropout, y, DROPOUT, True) if self.m.dropout else y


def host_work(cfg, f: dict[str, Any], *, seed: int, device, timer: Timer | None, iters: int) -> Work:
    """The case's phase of one layer, and (with ``timer``) the median time of each of its
    operations alone at the same shapes."""
    import torch
    layer = Layer(cfg, path=f["path"], dtype=f["dtype"], device=device, seed=seed)
    phase, recompute = f["phase"], cfg.parallel.recompute == "full"
    x = randn((layer.T, cfg.model.hidden), seed=seed + 10, dtype=f["dtype"], device=device)
    for p in layer.parameters():
        p.requires_grad_(True)
    grad = randn((layer.T, cfg.model.hidden), seed=seed + 11, dtype=f["dtype"], device=device)
    state: dict[str, Any] = {}
    grad_mode = not (phase == "fwd" and recompute)

    def forward() -> None:
        with torch.set_grad_enabled(grad_mode):
            state["out"] = layer.forward(x)

    def backward() -> None:
        state["grads"] = torch.autograd.grad(state["out"], layer.parameters(), grad, retain_graph=True)

    if phase == "bwd":
        with torch.enable_grad():
            state["out"] = layer.forward(x)
    ops_us = None if timer is None else _ops_us(layer, x, grad_mode=grad_mode, backward=phase == "bwd",
                                               timer=timer, iters=iters)

    def check() -> tuple[int, int]:
        ref = Layer(cfg, path="explicit", dtype="fp64", device=device, seed=seed)
        got = state["out"] if phase != "bwd" else state["grads"][0]
        want = ref.forward(x.detach().double())
        if phase == "bwd":
            for p in ref.parameters():
                p.requires_grad_(True)
            want = torch.autograd.grad(ref.forward(x.detach().double()), ref.parameters()[0], grad.double())[0]
        return count_outside(got, want, loose_tolerance(want, f["dtype"])), got.numel()

    result = (lambda: [state["out"]]) if phase != "bwd" else (lambda: list(state["grads"]))
    return Work(backward if phase == "bwd" else forward, check, result=result, aux={"ops_us_each": ops_us})


def call_group(ctx: Context) -> int:
    """The TP group of the call case: the preset's TP, at most the world, dividing it."""
    g = min(max(1, ctx.cfg.parallel.tp), ctx.world.world_size)
    return g if ctx.world.world_size % g == 0 else 1


def tp_call_work(ctx: Context, f: dict[str, Any], *, seed: int, iters: int) -> Work:
    """One TP reduction through a Megatron-style autograd function; at set-up, the host clock
    around the call alone, ``iters`` times, the group's ranks released together each time."""
    import time

    import torch
    import torch.distributed as dist
    g, world = f["group_size"], ctx.world.world_size
    groups = [ctx.world.group(list(range(i, i + g))) for i in range(0, world, g)]  # every rank, every group
    group, first = groups[ctx.rank // g], ctx.rank - ctx.rank % g

    class Reduce(torch.autograd.Function):  # reduce_from_tensor_model_parallel_region's forward
        @staticmethod
        def forward(c, x):
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(c, dy):
            return dy

    x = randn((f["elements"],), seed=seed, dtype=f["dtype"], device=ctx.device)
    timer = Timer(ctx.world)

    def call() -> None:
        Reduce.apply(x)
        x.div_(g)  # the mean: the values stay where they were

    host_us = []
    for _ in range(iters + 2):
        timer.sync()
        dist.barrier(group=group)
        timer.sync()
        t0 = time.perf_counter()
        Reduce.apply(x)
        host_us.append((time.perf_counter() - t0) * 1e6)
        x.div_(g)
    timer.sync()

    def check() -> tuple[int, int]:
        ref = x.clone()
        dist.broadcast(ref, src=first, group=group)
        return int((~torch.isfinite(x)).sum() + (x != ref).sum()), x.numel()
    return Work(call, check, output=x, aux={"call_host_us": statistics.median(host_us[2:])})


def loose_tolerance(ref, dtype: str):
    """32 roundings of the layer's ~20 operations, each at most u·(|y| + rms y) (u the storage
    dtype's, or the matmul engine's input rounding where larger: TF32): NaN, ±inf, zeros and
    any gross error are caught; in fp32 a result scaled by 0.99 is too, in bf16 it is not (the
    operation probes check that tightly)."""
    u = max(rounding_unit(dtype), input_roundoff(dtype))
    return 32 * u * (ref.abs() + ref.pow(2).mean().sqrt())


def _ops_us(layer: Layer, x, *, grad_mode: bool, backward: bool, timer: Timer, iters: int) -> dict[str, float]:
    """Each operation of the layer's forward (or its backward alone), timed by itself."""
    import torch
    calls: list[tuple[str, Callable, tuple]] = []

    def record(name, fn, *args):
        calls.append((name, fn, args))
        return fn(*args)
    with torch.enable_grad():
        layer.forward(x, record)
    out: dict[str, float] = {}
    for i, (name, fn, args) in enumerate(calls):
        leaves = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                       for a in args)
        if backward:
            with torch.enable_grad():
                y = fn(*leaves)
            g, inputs = torch.ones_like(y), [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            run = lambda: torch.autograd.grad(y, inputs, g, retain_graph=True)  # noqa: E731
        else:
            def run(fn=fn, leaves=leaves):
                with torch.set_grad_enabled(grad_mode):
                    fn(*leaves)
        for _ in range(2):
            run()
        out[f"{i:02d}-{name}"] = 1e6 * statistics.median(timer.time(run) for _ in range(iters))
    return out


class Host(ComputeProbe):
    name = "host"
    module = "microbench.host"
    description = __doc__.splitlines()[0]
    footer_metric = None
    columns = (("path", "path", ">8"), ("phase", "phase", ">9"), ("hidden", "hidden", ">6d"),
               ("seq", "seq", ">5d"), ("type", "dtype", ">4"), ("layer(us)", "time_us", ">10.1f"),
               ("ops(us)", "ops_us", ">9.1f"), ("host(us)", "host_us", ">9.1f"), ("#wrong", "num_wrong", ">6d"))

    def peak_cases(self, ctx: Context):
        return iter(())

    def op_cases(self, ctx: Context):
        cfg = host_config(ctx.cfg)
        for path in PATHS:
            for phase in host_phases(cfg):
                yield self.case(ctx, f"host-{path}-{phase}", kind="host", op="layer", path=path, phase=phase,
                                dtype=ctx.args.dtype, hidden=cfg.model.hidden, seq=cfg.model.seq_len,
                                heads=cfg.model.num_heads, recompute=cfg.parallel.recompute,
                                width=dict(HOST_WIDTH))
        g = call_group(ctx)
        if g > 1 and ctx.args.concurrent == "all":  # a collective needs every rank of its group
            yield self.case(ctx, "host-tp_call", kind="host", op="tp_call", path="-", phase="tp_call",
                            dtype=ctx.args.dtype, hidden=cfg.model.hidden, seq=cfg.model.seq_len,
                            heads=cfg.model.num_heads, recompute=cfg.parallel.recompute, group_size=g,
                            elements=cfg.parallel.micro_batch * cfg.model.seq_len * cfg.model.hidden,
                            width=dict(HOST_WIDTH))

    def op_setup(self, ctx: Context, case: Case, *, seed: int) -> Work:
        if case.fields["op"] == "tp_call":
            work = tp_call_work(ctx, case.fields, seed=seed, iters=ctx.args.iters)
            case.fields["call_host_us"] = work.aux["call_host_us"]
            return work
        timer = Timer(ctx.world) if seed == 1 else None  # the timed set-up measures the operations
        work = host_work(host_config(ctx.cfg), case.fields, seed=seed, device=ctx.device, timer=timer,
                         iters=ctx.args.iters)
        if work.aux["ops_us_each"] is not None:
            case.fields["ops_us_each"] = work.aux["ops_us_each"]
        return work

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        if case.fields["op"] == "tp_call":
            return {"host_us": case.fields["call_host_us"]}
        ops = sum(case.fields.get("ops_us_each", {}).values())
        return {"ops_us": ops, "host_us": max(0.0, time_s * 1e6 - ops),
                **({"note": f"the layer's phase ({time_s * 1e6:.1f} us) took less than its operations one by one "
                             f"({ops:.1f} us): host time clamped to 0"} if time_s * 1e6 < ops else {})}

    def max_buffer_bytes(self, args) -> int | None:
        return None


if __name__ == "__main__":
    main_for(Host())
