"""The reference decoder: embedding, layers, final norm, LM head, written against TP shards.

A layer is exactly the workload's op list (``microbench.model.workload``): norm, fused QKV
(column-parallel, (T, (d + 2·kv)/tp, d)), rotary on q and k, causal attention core, output
projection (row-parallel, (T, d, d/tp)) and its TP reduction, residual add, norm, fc1
(gate and up fused for SwiGLU, (T, 2f/tp, d)), activation, fc2 (row-parallel, (T, d, f/tp))
and its TP reduction, residual add. Activations are ``[s, b, d]`` (Megatron's layout) so
sequence parallelism shards dim 0.

Every layout builds the same full model: each full weight is drawn from a generator seeded by
(global seed, parameter name) and the rank keeps its slice, so tp2 and tp1 start from
identical numbers. Above ``EXACT_INIT_MAX_NUMEL`` elements a full weight is not materialised
(a 1T layer's FFN matrix is 2.4 G elements): the shard is drawn from its own
(seed, name, tp rank) stream instead, still deterministic but no longer layout-invariant.

How the collectives run is not this file's business: it calls the ``TPOps`` it is given
(see ``full_model.reference.parallel``).
"""
from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from microbench.model.config import TrainConfig

EXACT_INIT_MAX_NUMEL = 1 << 26  # 64 M elements (256 MB fp32): above this, init the shard only
INIT_STD = 0.02                 # GPT-2 / Megatron default init_method_std
NORM_EPS = 1e-5
ROPE_BASE = 10000.0             # RoFormer (Su et al. 2021), Llama


class TPOps(Protocol):
    """The tensor-parallel collectives a layer needs, as differentiable functions."""

    tp: int
    tp_rank: int
    sequence_parallel: bool

    def enter_column(self, x: torch.Tensor) -> torch.Tensor: ...
    """Before a column-parallel linear: identity/allreduce-in-backward, or SP allgather."""

    def exit_row(self, x: torch.Tensor) -> torch.Tensor: ...
    """After a row-parallel linear: allreduce, or SP reduce-scatter."""

    def vocab_reduce(self, x: torch.Tensor) -> torch.Tensor: ...
    """After the vocab-parallel embedding: allreduce, or SP reduce-scatter."""

    def vocab_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    """Per-token loss from vocab-sharded logits [T, V/tp] and global labels [T]."""


def param_seed(seed: int, name: str, shard: int | None = None) -> int:
    """A stable 63-bit seed per (global seed, parameter name[, shard]); crc32, not hash()."""
    key = name if shard is None else f"{name}#shard{shard}"
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63 - 1)


def init_shard(shape_full: tuple[int, int], *, seed: int, name: str, dim: int, tp: int,
               tp_rank: int, std: float = INIT_STD) -> torch.Tensor:
    """Rank ``tp_rank``'s slice along ``dim`` of a full N(0, std²) weight (see module doc)."""
    full_numel = shape_full[0] * shape_full[1]
    if full_numel <= EXACT_INIT_MAX_NUMEL:
        g = torch.Generator().manual_seed(param_seed(seed, name))
        full = torch.randn(shape_full, generator=g) * std
        return full.chunk(tp, dim=dim)[tp_rank].contiguous()
    shape = list(shape_full)
    shape[dim] //= tp
    g = torch.Generator().manual_seed(param_seed(seed, name, tp_rank))
    return torch.randn(shape, generator=g) * std


class Norm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm; weights replicated over TP."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, NORM_EPS)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + NORM_EPS)).to(x.dtype) * self.weight


def rotary_tables(seq: int, head_dim: int, *, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
    ang = torch.cat([ang, ang], dim=-1)  # [s, hd], rotate-half convention
    return ang.cos().to(dtype)[:, None, None, :], ang.sin().to(dtype)[:, None, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, hd]; rotate-half RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Layer(nn.Module):
    def __init__(self, cfg: TrainConfig, ops: TPOps, *, index: int, seed: int, dtype: torch.dtype, device):
        super().__init__()
        m = cfg.model
        tp, r = ops.tp, ops.tp_rank
        self.ops = ops
        self.heads, self.kv_heads = m.num_heads // tp, m.num_kv_heads // tp
        self.head_dim = m.head_dim
        self.gated = m.gated_mlp
        d, kv, f = m.hidden, m.kv_hidden, m.ffn_hidden
        name = f"layers.{index}"

        def shard(part: str, shape: tuple[int, int], dim: int, std: float = INIT_STD) -> torch.Tensor:
            return init_shard(shape, seed=seed, name=f"{name}.{part}", dim=dim, tp=tp, tp_rank=r, std=std)

        # Output layers scaled by 1/√(2L) (GPT-2, Megatron's output_layer_init_method).
        out_std = INIT_STD / math.sqrt(2 * m.num_layers)
        qkv = torch.cat([shard("q", (d, d), 0), shard("k", (kv, d), 0), shard("v", (kv, d), 0)])
        fc1 = [shard("fc1_gate", (f, d), 0)] if self.gated else []
        fc1 = torch.cat(fc1 + [shard("fc1_up", (f, d), 0)])
        p = dict(dtype=dtype, device=device)
        self.norm1 = Norm(d, m.norm).to(**p)
        self.norm2 = Norm(d, m.norm).to(**p)
        self.qkv = nn.Parameter(qkv.to(**p))                                     # column-parallel
        self.attn_proj = nn.Parameter(shard("attn_proj", (d, d), 1, out_std).to(**p))  # row-parallel
        self.fc1 = nn.Parameter(fc1.to(**p))                                     # column-parallel
        self.fc2 = nn.Parameter(shard("fc2", (d, f), 1, out_std).to(**p))        # row-parallel

    def attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s, b, _ = x.shape
        hd, h, kvh = self.head_dim, self.heads, self.kv_heads
        qkv = F.linear(x, self.qkv)
        q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
        q = apply_rotary(q.view(s, b, h, hd), *rope)
        k = apply_rotary(k.view(s, b, kvh, hd), *rope)
        v = v.view(s, b, kvh, hd)
        if kvh != h:  # GQA: each kv head serves h/kvh query heads
            k = k.repeat_interleave(h // kvh, dim=2)
            v = v.repeat_interleave(h // kvh, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.permute(2, 0, 1, 3).reshape(s, b, h * hd)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.fc1)
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return y

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ops = self.ops
        a = self.attention(ops.enter_column(self.norm1(x)), rope)
        x = x + ops.exit_row(F.linear(a, self.attn_proj))
        y = self.mlp(ops.enter_column(self.norm2(x)))
        return x + ops.exit_row(F.linear(y, self.fc2))


class Stage(nn.Module):
    """One pipeline stage: its layers, plus the embedding (first) and norm + head (last)."""

    def __init__(self, cfg: TrainConfig, ops: TPOps, *, stage: int, seed: int,
                 dtype: torch.dtype, device, recompute: str = "none"):
        super().__init__()
        m, p = cfg.model, cfg.parallel
        self.cfg, self.ops = cfg, ops
        self.first, self.last = stage == 0, stage == p.pp - 1
        self.recompute = recompute
        per = cfg.layers_per_stage
        self.layers = nn.ModuleList(Layer(cfg, ops, index=stage * per + i, seed=seed, dtype=dtype,
                                          device=device) for i in range(per))
        V, d, tp, r = m.vocab_size, m.hidden, ops.tp, ops.tp_rank
        self.vocab_start = r * (V // tp)
        self.embedding = None
        if self.first:
            emb = init_shard((V, d), seed=seed, name="embedding", dim=0, tp=tp, tp_rank=r)
            self.embedding = nn.Parameter(emb.to(dtype=dtype, device=device))
        self.final_norm = self.head = None
        if self.last:
            self.final_norm = Norm(d, m.norm).to(dtype=dtype, device=device)
            head = init_shard((V, d), seed=seed, name="lm_head", dim=0, tp=tp, tp_rank=r)
            self.head = nn.Parameter(head.to(dtype=dtype, device=device))
        self.rope = rotary_tables(m.seq_len, m.head_dim, dtype=dtype, device=device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] → [s, b, d] (÷ tp along s with SP); vocab-parallel lookup."""
        local = tokens.t() - self.vocab_start
        outside = (local < 0) | (local >= self.embedding.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.embedding)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ops.vocab_reduce(x)

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.recompute == "full" and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, self.rope, use_reentrant=False)
            else:
                x = layer(x, self.rope)
        return x

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the micro-batch's tokens; labels [b, s]."""
        h = self.ops.enter_column(self.final_norm(x))            # [s, b, d]
        logits = F.linear(h, self.head)                          # [s, b, V/tp]
        per_token = self.ops.vocab_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels.t().reshape(-1))
        return per_token.mean()

    def forward(self, x: torch.Tensor, *, tokens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: ``tokens`` in; others: activation ``x``. Last: the loss out."""
        if self.first:
            x = self.embed(tokens)
        x = self.run_layers(x)
        return self.loss(x, labels) if self.last else x


def activation_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """The [s, b, d] tensor a stage hands on (÷ tp along s with sequence parallelism)."""
    m, p = cfg.model, cfg.parallel
    s = m.seq_len // p.tp if p.sequence_parallel else m.seq_len
    return (s, p.micro_batch, m.hidden)

