"""The operations of one training step, per rank: the single source of truth for shapes.

Probes measure exactly these operations and the predictor prices exactly these operations;
neither derives a shape itself. Conventions (see DESIGN.md):

* ``T = micro_batch · seq_len`` tokens per micro-batch.
* Y = X·Wᵀ with ``in → out`` features: forward (m, n, k) = (T, out, in), dgrad (T, in, out),
  wgrad (out, in, T). FLOPs = 2·m·n·k·batch.
* Collective ``elements`` is S, the full logical buffer of nccl-tests: the whole buffer for
  allreduce, the *output* for allgather and the *input* for reduce-scatter.
* Counts are per layer per micro-batch (TP collectives, GEMMs, memory ops), per micro-batch
  per stage boundary (pipeline p2p), or per step (DP gradient sync, optimizer).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

from microbench.model.config import TrainConfig, dtype_bytes
from microbench.model.vocabulary import FRESH_COPY, PASS_PHASE

Phase = Literal["fwd", "dgrad", "wgrad", "bwd", "recompute", "step"]


@dataclass(frozen=True, slots=True)
class Gemm:
    name: str
    phase: Phase
    m: int
    n: int
    k: int
    batch: int = 1
    dtype: str = "bf16"
    count: int = 1

    @property
    def flop(self) -> int:
        return 2 * self.m * self.n * self.k * self.batch

    @property
    def bytes(self) -> int:
        """Minimum traffic: read A (m×k) and B (k×n), write C (m×n)."""
        return (self.m * self.k + self.k * self.n + self.m * self.n) * self.batch * dtype_bytes(self.dtype)


@dataclass(frozen=True, slots=True)
class Attention:
    """The attention core softmax(Q·Kᵀ/√d)·V of the rank's heads, causal."""

    phase: Literal["fwd", "bwd"]
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    dtype: str = "bf16"
    causal: bool = True
    name: str = "attention_core"

    @property
    def gemms(self) -> tuple[Gemm, ...]:
        """The batched GEMMs an unfused attention runs, one per head and sample: forward Q·Kᵀ
        (s×s output, k = head_dim) and P·V (k = s); backward dP = dO·Vᵀ (shaped as Q·Kᵀ),
        dV = Pᵀ·dO, dQ = dS·K and dK = dSᵀ·Q (shaped as P·V)."""
        s, hd, b = self.seq, self.head_dim, self.batch * self.heads
        scores = Gemm("attention_scores", self.phase, s, s, hd, b, self.dtype)
        context = Gemm("attention_context", self.phase, s, hd, s, b, self.dtype)
        return (scores, context) if self.phase == "fwd" else (scores, context, context, context)

    @property
    def flop(self) -> int:
        """Full (non-causal) count, the GEMMs': Q·Kᵀ and P·V are 2·s²·h each per head →
        4·b·s²·h·heads forward; backward does twice the forward's GEMM work."""
        return sum(g.flop for g in self.gemms)

    @property
    def flop_causal(self) -> int:
        """The causal half that a mask-aware kernel really needs to compute."""
        return self.flop // 2


@dataclass(frozen=True, slots=True)
class MemOp:
    """A memory-bound operation: its time is bytes moved / achieved bandwidth."""

    name: str
    phase: Literal["fwd", "recompute", "bwd", "step"]
    elements: int
    """Elements of the op's main input tensor (what a probe allocates)."""
    bytes: int
    """Bytes read plus written, the minimum the operation must move (see :func:`workload`)."""
    dtype: str = "bf16"
    count: int = 1
    explicit_attention_only: bool = False
    """Only exists when attention is not fused (the separate softmax)."""
    inner: int = 1
    """The tensor's last dimension (elements = rows × inner): how a probe lays it out."""


@dataclass(frozen=True, slots=True)
class HostPath:
    """The host's own time in one layer's phase — Python, autograd, the launch of every kernel
    and collective call — measured by ``microbench.host`` (or the framework's narrowed run) and
    composed against the same phase's device time by the predictor: the larger of the two on
    a device that queues kernels asynchronously, their sum on a synchronous one."""

    phase: Literal["fwd", "recompute", "bwd"]
    count: int = 1
    name: Literal["layer", "tp_call"] = "layer"
    """``layer``: the layer's host time in the phase; ``tp_call``: issuing one TP collective."""


@dataclass(frozen=True, slots=True)
class Collective:
    name: str
    kind: Literal["allreduce", "allgather", "reduce_scatter", "sendrecv"]
    axis: Literal["tp", "pp", "dp", "world"]
    elements: int
    dtype: str
    count: int
    phase: Phase
    group_size: int = 1
    overlappable: bool = False
    """True where the framework overlaps it with compute (the profile decides how much)."""

    @property
    def bytes(self) -> int:
        return self.elements * dtype_bytes(self.dtype)


@dataclass(frozen=True, slots=True)
class TpSync:
    """One TP reduction's cost in a step beyond the same call after a barrier (the ranks'
    arrival skew, the layer's caches; ``microbench.tp_sync``), with its phase and count."""

    name: str
    phase: Literal["fwd", "recompute", "bwd"]
    elements: int
    dtype: str
    count: int
    group_size: int
    kind: Literal["allreduce", "allgather", "reduce_scatter"] = "allreduce"  # the call it follows (SP: RS, AG)
    axis: str = "tp"

    @property
    def bytes(self) -> int:
        return self.elements * dtype_bytes(self.dtype)


@dataclass(frozen=True, slots=True)
class Workload:
    """Every operation of one training step on one rank, with its multiplicity: ``count`` per
    layer per micro-batch (the layer's operations), per micro-batch (a stage's extras, the
    pipeline p2p) or per step (``step``); ``phase`` from the vocabulary ``fwd | recompute |
    bwd | step`` (a GEMM's ``dgrad``/``wgrad`` are ``bwd``; :func:`step_phase`)."""

    config: TrainConfig
    tokens: int
    gemms: tuple[Gemm, ...]
    """One layer, one micro-batch: forward, dgrad, wgrad (and the recompute forward)."""
    attention: tuple[Attention, ...]
    memops: tuple[MemOp, ...]
    """One layer, one micro-batch (and what the recompute runs again)."""
    collectives: tuple[Collective, ...]
    """TP collectives of one layer, one micro-batch (recompute included when configured)."""
    host: tuple[HostPath, ...]
    """The host's own time of one layer, one per phase the step runs."""
    syncs: tuple[TpSync, ...]
    """One layer, one micro-batch: the in-step cost of each TP reduction beyond its idle price."""
    p2p: tuple[Collective, ...]
    """Pipeline send/recv per micro-batch per boundary: activation forward, gradient backward."""
    first: tuple
    """First stage only, per micro-batch: the embedding, its backward, its TP reduction."""
    last: tuple
    """Last stage only, per micro-batch: the LM head, final norm (and its backward),
    cross-entropy, the TP reduction of the head's input gradient."""
    step: tuple
    """Once per step: the DP sync, DeepSpeed's gradient copies, the optimizer (:func:`_step`)."""
    head_gemms: tuple[Gemm, ...]
    """The LM head's GEMMs (what the GEMM probe measures; priced through ``last``)."""
    head_memops: tuple[MemOp, ...]
    """The stage extras' memory-bound ops a probe measures (forward)."""
    dp: tuple[Collective, ...]
    """DP gradient sync of one step (the reduction and the ZeRO allgather), once each."""
    dp_grad_bytes: int
    optimizer_params: int
    """Parameters this rank's optimizer updates (÷ dp under ZeRO ≥ 1)."""
    optimizer_bytes: int
    """AdamW bytes per step: fp32 master, m, v read+write, fp32 grad read, model-dtype write."""
    stage: int = 0

    @property
    def activation_elements(self) -> int:
        """The [mbs·s, d] activation a layer hands on (the TP allreduce message)."""
        return self.tokens * self.config.model.hidden

    @property
    def layer(self) -> tuple:
        """Every operation of one layer per micro-batch, device and host."""
        return (*self.gemms, *self.attention, *self.memops, *self.collectives, *self.syncs, *self.host)

    def by_name(self, name: str, phase: str | None = None) -> list[Gemm]:
        return [g for g in self.gemms + self.head_gemms
                if g.name == name and (phase is None or g.phase == phase)]


def step_phase(op) -> str:
    """An operation's phase in the vocabulary ``fwd | recompute | bwd | step``."""
    if isinstance(op, Attention) and op.name.endswith("recompute"):
        return "recompute"
    return PASS_PHASE[op.phase]


def linear_gemms(name: str, tokens: int, fan_in: int, fan_out: int, dtype: str) -> tuple[Gemm, ...]:
    """The three GEMMs of Y = X·Wᵀ (DESIGN.md): fwd (T,out,in), dgrad (T,in,out), wgrad (out,in,T)."""
    return (Gemm(name, "fwd", tokens, fan_out, fan_in, dtype=dtype),
            Gemm(name, "dgrad", tokens, fan_in, fan_out, dtype=dtype),
            Gemm(name, "wgrad", fan_out, fan_in, tokens, dtype=dtype))


# Adam bytes per parameter per step with fp32 master weights: master, m, v each read and
# written (3 × 8), fp32 gradient read (4), updated weight written in the model dtype.
def adam_bytes_per_param(model_dtype: str) -> int:
    return 3 * 8 + 4 + dtype_bytes(model_dtype)


@functools.lru_cache(maxsize=4096)  # pure in its (frozen) arguments; the calibration fit prices each config 10³ times
def workload(cfg: TrainConfig, *, stage: int | None = None,
             p2p_scatter_gather: bool = False) -> Workload:
    """Every operation of one training step on one rank of ``cfg`` (see :class:`Workload`).

    ``stage`` picks the pipeline stage whose parameters size the DP sync and optimizer
    (default: the largest one). ``p2p_scatter_gather`` sends 1/tp of the activation per
    rank across a stage boundary (Megatron's scatter-gather optimisation); sequence
    parallelism implies it.
    """
    p = cfg.parallel
    if stage is None:
        stage = max(range(p.pp), key=cfg.stage_params)
    T = p.micro_batch * cfg.model.seq_len
    collectives = _tp_collectives(cfg, T)
    head_gemms, head_memops = _head(cfg, T)
    dp, step, opt = _step(cfg, stage)
    return Workload(
        config=cfg, tokens=T, gemms=_layer_gemms(cfg, T), attention=_attention(cfg),
        memops=_layer_memops(cfg, T), collectives=collectives, host=_host_paths(cfg, collectives), syncs=_syncs(collectives),
        p2p=_p2p(cfg, T, p2p_scatter_gather), first=_first(head_memops, collectives),
        last=_last(head_gemms, head_memops, collectives), step=step, head_gemms=head_gemms,
        head_memops=head_memops, dp=dp, dp_grad_bytes=cfg.stage_params(stage) * dtype_bytes(p.grad_dtype),
        optimizer_params=opt.elements, optimizer_bytes=opt.bytes, stage=stage)


def _layer_gemms(cfg: TrainConfig, T: int) -> tuple[Gemm, ...]:
    m, p, dt = cfg.model, cfg.parallel, cfg.model.dtype
    d, f, tp = m.hidden, m.ffn_hidden, p.tp
    fc1_out = m.ffn_matrices - 1  # gate and up fused into one GEMM for a gated MLP
    gemms = (linear_gemms("qkv", T, d, (d + 2 * m.kv_hidden) // tp, dt)
             + linear_gemms("attn_proj", T, d // tp, d, dt)
             + linear_gemms("fc1", T, d, fc1_out * f // tp, dt)
             + linear_gemms("fc2", T, f // tp, d, dt))
    if p.recompute == "full":  # the forward runs again inside the backward
        gemms += tuple(Gemm(g.name, "recompute", g.m, g.n, g.k, g.batch, g.dtype)
                       for g in gemms if g.phase == "fwd")
    return gemms


def _attention(cfg: TrainConfig) -> tuple[Attention, ...]:
    m, p = cfg.model, cfg.parallel
    heads, kv_heads = m.num_heads // p.tp, m.num_kv_heads // p.tp
    attention = tuple(Attention(ph, p.micro_batch, heads, kv_heads, m.seq_len, m.head_dim, m.dtype)
                      for ph in ("fwd", "bwd"))
    if p.recompute in ("full", "selective"):  # selective recompute re-runs exactly the core
        attention += (Attention("fwd", p.micro_batch, heads, kv_heads, m.seq_len, m.head_dim, m.dtype,
                                name="attention_core_recompute"),)
    return attention


def _layer_memops(cfg: TrainConfig, T: int) -> tuple[MemOp, ...]:
    """The memory-bound tail (minimum traffic, read + write); norms and residuals act on T/tp
    tokens under sequence parallelism. Full recompute runs the forward's again; selective
    recompute the attention core's (the separate softmax and dropout of an unfused core)."""
    m, p, dt = cfg.model, cfg.parallel, cfg.model.dtype
    tp, d, f, el = p.tp, m.hidden, m.ffn_hidden, dtype_bytes(dt)
    heads, kv_heads = m.num_heads // tp, m.num_kv_heads // tp
    t_local = T // tp if p.sequence_parallel else T
    qk = T * (d + m.kv_hidden) // tp
    F = T * f // tp
    # (name, elements, forward bytes, backward bytes, per layer, inner dimension)
    ops = [
        # norm: fwd reads x, writes y; bwd reads x and dy, writes dx. Two per layer.
        ("norm", t_local * d, 2 * t_local * d * el, 3 * t_local * d * el, 2, d),
        # rotary on q and k: a rotation each way, read + write.
        ("rotary", qk, 2 * qk * el, 2 * qk * el, 1, (heads + kv_heads) * m.head_dim),
        # SwiGLU: fwd reads gate and up, writes the product; bwd reads gate, up, dy, writes
        # dgate and dup. GELU: fwd reads x, writes y; bwd reads x, dy, writes dx.
        ("swiglu", F, 3 * F * el, 5 * F * el, 1, f // tp) if m.gated_mlp else
        ("gelu", F, 2 * F * el, 3 * F * el, 1, f // tp),
        # residual: fwd reads two, writes one; bwd is the gradient sum where the branches meet.
        # (with dropout, Megatron's fused bias-dropout-add also writes a one-byte mask and the
        # backward reads it)
        ("residual_add", t_local * d, (3 * el + m.dropout) * t_local * d,
         (3 * el + m.dropout) * t_local * d, 2, d),
    ]
    memops = []
    for name, elems, fwd_bytes, bwd_bytes, count, inner in ops:
        memops.append(MemOp(name, "fwd", elems, fwd_bytes, dt, count, inner=inner))
        memops.append(MemOp(name, "bwd", elems, bwd_bytes, dt, count, inner=inner))
    scores = p.micro_batch * heads * m.seq_len * m.seq_len
    memops.append(MemOp("softmax", "fwd", scores, 2 * scores * el, dt, 1, True, inner=m.seq_len))
    memops.append(MemOp("softmax", "bwd", scores, 3 * scores * el, dt, 1, True, inner=m.seq_len))
    if m.dropout:
        # Dropout on the attention probabilities (unfused path): fwd reads P, writes P' and a
        # one-byte mask; bwd reads dP' and the mask, writes dP (Korthikanti et al. 2022, §4.1:
        # the mask is as²b bytes, the output 2as²b).
        for ph in ("fwd", "bwd"):
            memops.append(MemOp("attention_dropout", ph, scores, scores * (2 * el + 1), dt, 1, True,
                                inner=m.seq_len))
    again = [op for op in memops if op.phase == "fwd" and
             (p.recompute == "full" or (p.recompute == "selective" and op.explicit_attention_only))]
    return tuple(memops) + tuple(dataclasses.replace(op, phase="recompute") for op in again)


def _tp_collectives(cfg: TrainConfig, T: int) -> tuple[Collective, ...]:
    """TP collectives of one layer (Megatron: 2 in forward, 2 in backward; the recompute
    forward repeats the forward's 2). With SP each allreduce becomes AG + RS of the same S."""
    m, p, dt, tp = cfg.model, cfg.parallel, cfg.model.dtype, cfg.parallel.tp
    if tp == 1:
        return ()
    S = T * m.hidden
    collectives: list[Collective] = []
    for phase in ("fwd", "bwd", "recompute") if p.recompute == "full" else ("fwd", "bwd"):
        if p.sequence_parallel:
            collectives.append(Collective("tp_allgather", "allgather", "tp", S, dt, 2, phase, tp))
            collectives.append(Collective("tp_reduce_scatter", "reduce_scatter", "tp", S, dt, 2, phase, tp))
        else:
            collectives.append(Collective("tp_allreduce", "allreduce", "tp", S, dt, 2, phase, tp))
    if p.sequence_parallel:  # the backward re-gathers the sharded input for each wgrad
        collectives.append(Collective("tp_allgather_wgrad", "allgather", "tp", S, dt, 2, "bwd", tp,
                                      overlappable=True))
    return tuple(collectives)


def _syncs(collectives: tuple[Collective, ...]) -> tuple[TpSync, ...]:
    """One :class:`TpSync` per TP reduction that waits for the group (not the backward's
    overlapped wgrad re-gathers), with its phase and count."""
    return tuple(TpSync(f"{c.name}_sync", c.phase, c.elements, c.dtype, c.count, c.group_size, c.kind)
                 for c in collectives if c.axis == "tp" and not c.overlappable)


def _host_paths(cfg: TrainConfig, collectives: tuple[Collective, ...]) -> tuple[HostPath, ...]:
    """The layer's host time per phase, and per phase the host's TP collective calls (the layer's
    TP collectives of that phase, each call issued by the host whether or not it overlaps)."""
    phases = ("fwd", "recompute", "bwd") if cfg.parallel.recompute == "full" else ("fwd", "bwd")
    calls = {ph: sum(c.count for c in collectives if c.axis == "tp" and c.phase == ph) for ph in phases}
    return (*(HostPath(ph) for ph in phases),
            *(HostPath(ph, calls[ph], "tp_call") for ph in phases if calls[ph]))


def _p2p(cfg: TrainConfig, T: int, scatter_gather: bool) -> tuple[Collective, ...]:
    p, dt = cfg.parallel, cfg.model.dtype
    if p.pp == 1:
        return ()
    act = T * cfg.model.hidden // (p.tp if (p.sequence_parallel or scatter_gather) else 1)
    return (Collective("pp_activation", "sendrecv", "pp", act, dt, p.interleave, "fwd", 2),
            Collective("pp_gradient", "sendrecv", "pp", act, dt, p.interleave, "bwd", 2))


def _head(cfg: TrainConfig, T: int) -> tuple[tuple[Gemm, ...], tuple[MemOp, ...]]:
    m, dt = cfg.model, cfg.model.dtype
    d, el, V = m.hidden, dtype_bytes(dt), m.vocab_size // cfg.parallel.tp
    head_memops = (
        MemOp("embedding", "fwd", T * d, 2 * T * d * el, dt, inner=d),          # gather rows, write
        MemOp("final_norm", "fwd", T * d, 2 * T * d * el, dt, inner=d),
        # logits read in the model dtype, fp32 softmax statistics pass, gradient written.
        MemOp("cross_entropy", "fwd", T * V, T * V * (2 * el + 4), dt, inner=V),
    )
    return linear_gemms("lm_head", T, d, V, dt), head_memops


def _tp_reduction(collectives: tuple[Collective, ...], name: str, phase: str) -> tuple[Collective, ...]:
    """One TP reduction of [T, d] outside the layers (the vocab-parallel embedding's output,
    the LM head input's gradient), shaped as the layer's first forward reduction."""
    fwd = [c for c in collectives if c.phase == "fwd" and c.kind in ("allreduce", "reduce_scatter")]
    if not fwd:
        return ()
    red = dataclasses.replace(fwd[0], name=name, phase=phase, count=1)
    return (red, *_syncs((red,)))


def _first(head_memops: tuple[MemOp, ...], collectives: tuple[Collective, ...]) -> tuple:
    """First stage, per micro-batch: the embedding lookup, its backward scatter (the same bytes
    twice) and its TP reduction."""
    emb = next(op for op in head_memops if op.name == "embedding")
    return (emb, dataclasses.replace(emb, phase="bwd", count=2),
            *_tp_reduction(collectives, "embedding_tp_reduce", "fwd"))


def _last(head_gemms: tuple[Gemm, ...], head_memops: tuple[MemOp, ...], collectives) -> tuple:
    """Last stage, per micro-batch: LM head GEMMs, final norm (its backward moves twice the
    bytes), cross-entropy, and the TP reduction of the head input's gradient."""
    norm = next(op for op in head_memops if op.name == "final_norm")
    ce = next(op for op in head_memops if op.name == "cross_entropy")
    return (*head_gemms, norm, dataclasses.replace(norm, phase="bwd", bytes=2 * norm.bytes), ce,
            *_tp_reduction(collectives, "lm_head_tp_reduce", "bwd"))


def _deepspeed_passes(n: int, dp: int, zero: int) -> tuple[tuple[str, int, int], ...]:
    """(op, elements, passes) per reduction of DeepSpeed 0.18's gradient sync, read from its code
    and seen in a profiled Megatron-DeepSpeed run (``full_model.megatron.profilehook``'s stacks):
    ZeRO-0 (``engine.allreduce_bucket``) flattens into a new buffer, scales, copies back;
    ZeRO-1/2 (``stage_1_and_2``) copy into the bucket that ``setup_buckets`` allocates for each
    reduction, scale it, flatten the rank-ordered slices into a new buffer (full passes), copy
    the rank's slice back and into ``grads_in_partition``, allocated again after each reduction
    (``_release_ipg_buffers``) (passes over 1/dp)."""
    if zero == 0:
        return (FRESH_COPY, n, 1), ("copy", n, 2)
    return (FRESH_COPY, n, 2), ("copy", n, 1), (FRESH_COPY, n // dp, 1), ("copy", n // dp, 1)


def _step(cfg: TrainConfig, stage: int) -> tuple[tuple[Collective, ...], tuple, MemOp]:
    """The DP sync once (what the DP probe measures), the step's ops, the optimizer. DeepSpeed
    (``grad_sync``) allreduces each flattened bucket, ZeRO-1/2 too, with passes over the gradient
    (:func:`_deepspeed_passes`). ZeRO-1 reduces at the boundary, ZeRO-2 in every micro-batch;
    ZeRO-3 reduce-scatters in every micro-batch, gathers in every forward and backward; flat
    buffers reduce in place (ZeRO: reduce-scatter)."""
    p, dt, params, mb = cfg.parallel, cfg.model.dtype, cfg.stage_params(stage), cfg.parallel.num_microbatches
    reductions, ops, dp = mb if p.zero_stage >= 2 else 1, (), ()
    if p.dp > 1:
        deepspeed = p.grad_sync == "deepspeed" and p.zero_stage <= 2
        kind = "allreduce" if deepspeed or p.zero_stage == 0 else "reduce_scatter"
        reduce = Collective(f"dp_{kind}", kind, "dp", params, p.grad_dtype, 1, "step", p.dp, overlappable=True)
        gather = (Collective("dp_allgather", "allgather", "dp", params, dt, 1, "step", p.dp),) if p.zero_stage else ()
        dp = (reduce, *gather)
        ops = (dataclasses.replace(reduce, count=reductions),
               *(dataclasses.replace(g, count=2 * mb if p.zero_stage >= 3 else 1) for g in gather))
        for name, n, passes in _deepspeed_passes(params, p.dp, p.zero_stage) if deepspeed else ():
            ops += (MemOp(name, "step", n, 2 * n * dtype_bytes(p.grad_dtype), p.grad_dtype, passes * reductions,
                          inner=n),)
    opt_params = params // p.dp if p.zero_stage >= 1 else params
    opt = MemOp("adamw", "step", opt_params, opt_params * adam_bytes_per_param(dt), "fp32", inner=opt_params)
    return dp, ops + (opt,), opt


def distinct_gemms(cfg: TrainConfig) -> list[Gemm]:
    """Every GEMM of one layer and the LM head, forward, dgrad and wgrad, once each (the
    recompute forward repeats the forward's shapes): what a GEMM probe must measure."""
    w = workload(cfg)
    return [g for g in w.gemms + w.head_gemms if g.phase != "recompute"]
