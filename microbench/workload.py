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

import functools
from dataclasses import dataclass
from typing import Literal

from .config import TrainConfig, dtype_bytes

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
    phase: Literal["fwd", "bwd"]
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
class Workload:
    config: TrainConfig
    tokens: int
    gemms: tuple[Gemm, ...]
    """One layer, one micro-batch, forward + dgrad + wgrad."""
    attention: tuple[Attention, ...]
    memops: tuple[MemOp, ...]
    collectives: tuple[Collective, ...]
    """TP collectives of one layer, one micro-batch (recompute included when configured)."""
    p2p: tuple[Collective, ...]
    """Pipeline send/recv per micro-batch per boundary: activation forward, gradient backward."""
    head_gemms: tuple[Gemm, ...]
    """Last stage only, once per micro-batch: the LM head."""
    head_memops: tuple[MemOp, ...]
    """Last stage: final norm and cross-entropy over the vocab shard; first stage: embedding."""
    dp: tuple[Collective, ...]
    """DP gradient sync of one step (allreduce, or ZeRO reduce-scatter + allgather)."""
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

    def layer_flop(self, phases: tuple[str, ...] = ("fwd", "dgrad", "wgrad", "bwd")) -> int:
        gemm = sum(g.flop * g.count for g in self.gemms if g.phase in phases)
        attn = sum(a.flop for a in self.attention if a.phase in phases)
        return gemm + attn

    def by_name(self, name: str, phase: str | None = None) -> list[Gemm]:
        return [g for g in self.gemms + self.head_gemms
                if g.name == name and (phase is None or g.phase == phase)]


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
    """Every operation of one layer per micro-batch on one rank of ``cfg``.

    ``stage`` picks the pipeline stage whose parameters size the DP sync and optimizer
    (default: the largest one). ``p2p_scatter_gather`` sends 1/tp of the activation per
    rank across a stage boundary (Megatron's scatter-gather optimisation); sequence
    parallelism implies it.
    """
    m, p = cfg.model, cfg.parallel
    dt, tp = m.dtype, p.tp
    T = p.micro_batch * m.seq_len
    d, f = m.hidden, m.ffn_hidden
    el = dtype_bytes(dt)
    if stage is None:
        stage = max(range(p.pp), key=cfg.stage_params)

    fc1_out = m.ffn_matrices - 1  # gate and up fused into one GEMM for a gated MLP
    gemms = (linear_gemms("qkv", T, d, (d + 2 * m.kv_hidden) // tp, dt)
             + linear_gemms("attn_proj", T, d // tp, d, dt)
             + linear_gemms("fc1", T, d, fc1_out * f // tp, dt)
             + linear_gemms("fc2", T, f // tp, d, dt))
    if p.recompute == "full":  # the forward runs again inside the backward
        gemms += tuple(Gemm(g.name, "recompute", g.m, g.n, g.k, g.batch, g.dtype)
                       for g in gemms if g.phase == "fwd")

    heads, kv_heads = m.num_heads // tp, m.num_kv_heads // tp
    attention = tuple(Attention(ph, p.micro_batch, heads, kv_heads, m.seq_len, m.head_dim, dt)
                      for ph in ("fwd", "bwd"))
    if p.recompute in ("full", "selective"):  # selective recompute re-runs exactly the core
        attention += (Attention("fwd", p.micro_batch, heads, kv_heads, m.seq_len, m.head_dim, dt,
                                name="attention_core_recompute"),)

    # Memory-bound tail. Norms, residuals act on T/tp tokens under sequence parallelism.
    t_local = T // tp if p.sequence_parallel else T
    qk = T * (d + m.kv_hidden) // tp
    # (name, elements, forward bytes, backward bytes, per layer): minimum traffic, read + write.
    F = T * f // tp
    qk_inner = (heads + kv_heads) * m.head_dim
    ops = [
        # norm: fwd reads x, writes y; bwd reads x and dy, writes dx. Two per layer.
        ("norm", t_local * d, 2 * t_local * d * el, 3 * t_local * d * el, 2, d),
        # rotary on q and k: a rotation each way, read + write.
        ("rotary", qk, 2 * qk * el, 2 * qk * el, 1, qk_inner),
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
        memops.append(MemOp("attention_dropout", "fwd", scores, scores * (2 * el + 1), dt, 1, True,
                            inner=m.seq_len))
        memops.append(MemOp("attention_dropout", "bwd", scores, scores * (2 * el + 1), dt, 1, True,
                            inner=m.seq_len))

    # TP collectives of one layer (Megatron: 2 in forward, 2 in backward; the recompute
    # forward repeats the forward's 2). With SP each allreduce becomes AG + RS of the same S.
    collectives: list[Collective] = []
    if tp > 1:
        passes = [("fwd", False), ("bwd", False)] + ([("recompute", False)] if p.recompute == "full" else [])
        for phase, _ in passes:
            if p.sequence_parallel:
                collectives.append(Collective("tp_allgather", "allgather", "tp", T * d, dt, 2, phase, tp))
                collectives.append(Collective("tp_reduce_scatter", "reduce_scatter", "tp", T * d, dt, 2, phase, tp))
            else:
                collectives.append(Collective("tp_allreduce", "allreduce", "tp", T * d, dt, 2, phase, tp))
        if p.sequence_parallel:  # the backward re-gathers the sharded input for each wgrad
            collectives.append(Collective("tp_allgather_wgrad", "allgather", "tp", T * d, dt, 2,
                                          "bwd", tp, overlappable=True))

    p2p: tuple[Collective, ...] = ()
    if p.pp > 1:
        act = T * d // (tp if (p.sequence_parallel or p2p_scatter_gather) else 1)
        p2p = (Collective("pp_activation", "sendrecv", "pp", act, dt, p.interleave, "fwd", 2),
               Collective("pp_gradient", "sendrecv", "pp", act, dt, p.interleave, "bwd", 2))

    V = m.vocab_size // tp
    head_gemms = linear_gemms("lm_head", T, d, V, dt)
    head_memops = (
        MemOp("embedding", "fwd", T * d, 2 * T * d * el, dt, inner=d),          # gather rows, write
        MemOp("final_norm", "fwd", T * d, 2 * T * d * el, dt, inner=d),
        # logits read in the model dtype, fp32 softmax statistics pass, gradient written.
        MemOp("cross_entropy", "fwd", T * V, T * V * (2 * el + 4), dt, inner=V),
    )

    stage_params = cfg.stage_params(stage)
    grad_el = dtype_bytes(p.grad_dtype)
    dp: tuple[Collective, ...] = ()
    if p.dp > 1:
        if p.zero_stage >= 1:
            dp = (Collective("dp_reduce_scatter", "reduce_scatter", "dp", stage_params, p.grad_dtype,
                             1, "step", p.dp, overlappable=True),
                  Collective("dp_allgather", "allgather", "dp", stage_params, dt, 1, "step", p.dp))
        else:
            dp = (Collective("dp_allreduce", "allreduce", "dp", stage_params, p.grad_dtype, 1,
                             "step", p.dp, overlappable=True),)
    opt_params = stage_params // p.dp if p.zero_stage >= 1 else stage_params
    return Workload(
        config=cfg, tokens=T, gemms=gemms, attention=attention, memops=tuple(memops),
        collectives=tuple(collectives), p2p=p2p, head_gemms=head_gemms, head_memops=head_memops,
        dp=dp, dp_grad_bytes=stage_params * grad_el, optimizer_params=opt_params,
        optimizer_bytes=opt_params * adam_bytes_per_param(dt), stage=stage)


def megatron_lm_flop(cfg: TrainConfig) -> float:
    """Model FLOPs of one step, Megatron-DeepSpeed's "LM" formula (DESIGN.md) — what its
    iteration line divides by step time and world size for "[LM]-TFLOPs":
    F = 12·B·s·L·h²·(1 + (f/h)·(3/2 if SwiGLU else 1) + kv_heads/heads + s/h + V/(2·L·h)),
    no recompute factor (recomputation is not useful model work)."""
    m = cfg.model
    B, s, L, h = cfg.parallel.global_batch, m.seq_len, m.num_layers, m.hidden
    mlp = (m.ffn_hidden / h) * (1.5 if m.gated_mlp else 1.0)
    return 12 * B * s * L * h * h * (1 + mlp + m.num_kv_heads / m.num_heads + s / h
                                     + m.vocab_size / (2 * L * h))


def memory_bytes(cfg: TrainConfig, *, stage: int | None = None) -> dict[str, int]:
    """Bytes per rank of one stage: weights, gradients, optimizer state, activations.

    Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4):
    per layer s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes with TP, ÷t for the first term with
    sequence parallelism; 2·s·b·h per layer (the layer input) with full recompute; selective
    recompute drops the 5·a·s/h attention term. The 1F1B schedule keeps up to pp micro-batches
    in flight on the first stage; the interleaved one about (1 + 1/v) times as many. The MLP term is scaled by f/(4h) for non-4h MLPs.
    """
    m, p = cfg.model, cfg.parallel
    if stage is None:
        stage = max(range(p.pp), key=cfg.stage_params)
    params = cfg.stage_params(stage)
    s, b, h, a, t = m.seq_len, p.micro_batch, m.hidden, m.num_heads, p.tp
    mlp_scale = m.ffn_hidden * (1.5 if m.gated_mlp else 1.0) / (4 * h)
    # 34 = 10 replicated unless SP (inputs, dropout masks, norms) + 24 sharded: 8 attention
    # (Q, K, V, projection input) + 16 MLP (first linear output, activation output)
    # Without dropout the two sbh one-byte masks and the as²b mask + 2as²b dropout output go:
    # 32 + 2as/h (Korthikanti's 34 + 5as/h counts GPT-3 with dropout).
    sharded = (8 + 16 * mlp_scale) / t
    replicated = (10 if m.dropout else 8) / (t if p.sequence_parallel else 1)
    attn_full = (5 if m.dropout else 2) * a * s / (h * t)
    attn = 0 if p.recompute == "selective" else attn_full
    per_layer = s * b * h * (replicated + sharded + attn)
    if p.recompute == "full":
        per_layer = 2 * s * b * h / (t if p.sequence_parallel else 1)
    # Micro-batches whose activations a stage holds at the 1F1B peak: pp − stage. The
    # interleaved schedule warms up with 2·(pp − stage − 1) + (v − 1)·pp chunk forwards
    # (Megatron-LM, schedules.py) plus the one in flight, each chunk 1/v of the stage's layers.
    if p.pp == 1:
        in_flight = 1.0
    elif p.interleave == 1:
        in_flight = min(p.pp - stage, p.num_microbatches)
    else:
        chunks = 2 * (p.pp - stage - 1) + (p.interleave - 1) * p.pp + 1
        in_flight = min(chunks, p.num_microbatches * p.interleave) / p.interleave
    activations = int(per_layer * cfg.layers_per_stage * in_flight)
    if p.recompute == "full":  # plus one layer's full working set during its recompute
        activations += int(s * b * h * (replicated + sharded + attn_full))
    opt_params = params // p.dp if p.zero_stage >= 1 else params
    # Optimizer state per parameter (Megatron-LM docs/source/api-guide/dist_optimizer.md,
    # "fp16 param, fp16 grads: 20 bytes; bf16 param, fp32 grads: 18; fp32: 16" of which the
    # optimizer's share is): fp32 master copy, Adam m and v (12 B), plus an fp32 copy of the
    # gradient when the model's gradients are half precision (4 B); fp32 training keeps m, v
    # (8 B). ZeRO-1 / the distributed optimizer shard all of it over DP.
    if m.dtype == "fp32":
        opt_bytes = 8
    else:
        opt_bytes = 12 + (4 if p.grad_dtype != "fp32" else 0)
    grads = params * dtype_bytes(p.grad_dtype)
    if p.zero_stage >= 2:
        grads //= p.dp
    weights = params * dtype_bytes(m.dtype)
    if p.zero_stage >= 3:
        # partitioned, plus the gathered layer in use and the one prefetched behind it
        weights = weights // p.dp + 2 * (m.layer_params // p.tp) * dtype_bytes(m.dtype)
    return {"weights": weights, "gradients": grads, "optimizer": opt_params * opt_bytes,
            "activations": activations}
