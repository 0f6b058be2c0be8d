"""Bytes per rank of one pipeline stage: weights, gradients, optimizer state, activations
(the memory check of every prediction)."""
from __future__ import annotations

from microbench.model.config import TrainConfig, dtype_bytes


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
