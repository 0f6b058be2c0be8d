"""Workload numbers for alcf-1t at TP 12, computed by hand from DESIGN.md."""
import pytest

from microbench.model.config import alcf_1t, tiny, with_layout
from microbench.model.memory import memory_bytes
from microbench.model.workload import workload

D, F, S, TP, V = 24576, 98304, 2048, 12, 32256


def shape(w, name, phase):
    (g,) = w.by_name(name, phase)
    return g.m, g.n, g.k


def test_qkv_forward_is_2048_by_6144_by_24576():
    assert shape(workload(alcf_1t()), "qkv", "fwd") == (2048, 3 * D // TP, D) == (2048, 6144, 24576)


@pytest.mark.parametrize("name, fan_in, fan_out", [
    ("qkv", D, 3 * D // TP), ("attn_proj", D // TP, D),
    ("fc1", D, 2 * F // TP),  # SwiGLU: gate and up fused
    ("fc2", F // TP, D), ("lm_head", D, V // TP)])
def test_three_phases_follow_the_convention(name, fan_in, fan_out):
    w = workload(alcf_1t())
    T = S
    assert shape(w, name, "fwd") == (T, fan_out, fan_in)
    assert shape(w, name, "dgrad") == (T, fan_in, fan_out)
    assert shape(w, name, "wgrad") == (fan_out, fan_in, T)
    for phase in ("fwd", "dgrad", "wgrad"):
        (g,) = w.by_name(name, phase)
        assert g.flop == 2 * fan_in * fan_out * T and g.dtype == "bf16"


def test_tp_allreduce_message_is_100_66_MB():
    w = workload(alcf_1t())
    ar = [c for c in w.collectives if c.kind == "allreduce"]
    assert {c.elements for c in ar} == {S * D}
    assert ar[0].bytes == 100_663_296  # 2048 × 24576 × 2 B = 100.66 MB
    # 2 forward + 2 backward + 2 in the recompute forward (full recompute)
    assert sum(c.count for c in ar) == 6
    assert {c.group_size for c in ar} == {12}


def test_without_recompute_four_allreduces_per_layer():
    w = workload(with_layout(alcf_1t(), recompute="none"))
    assert sum(c.count for c in w.collectives if c.kind == "allreduce") == 4
    assert not [g for g in w.gemms if g.phase == "recompute"]


def test_sequence_parallel_turns_allreduce_into_allgather_reduce_scatter():
    # 2048 tokens do not split 12 ways, so sequence parallelism runs at TP 8 here
    w = workload(with_layout(alcf_1t(), tp=8, sequence_parallel=True, recompute="none"))
    kinds = {(c.kind, c.phase): c.count for c in w.collectives if not c.overlappable}
    assert kinds == {("allgather", "fwd"): 2, ("reduce_scatter", "fwd"): 2,
                     ("allgather", "bwd"): 2, ("reduce_scatter", "bwd"): 2}
    assert {c.elements for c in w.collectives} == {S * D}
    # the activation crossing a stage boundary is sharded too
    assert w.p2p[0].elements == S * D // 8


def test_pipeline_p2p_and_dp_gradient_bytes():
    c = alcf_1t()
    w = workload(c)
    assert [p.phase for p in w.p2p] == ["fwd", "bwd"] and w.p2p[0].elements == S * D
    assert w.dp == ()  # dp = 1 in the 1T run
    assert w.dp_grad_bytes == c.params_per_rank * 4  # fp32 gradient accumulation
    c2 = with_layout(c, tp=12, pp=64, dp=2)
    w2 = workload(c2)
    assert [x.kind for x in w2.dp] == ["allreduce", "allgather"]  # ZeRO-1 under DeepSpeed (see below)
    assert w2.dp[0].elements == c2.params_per_rank and w2.dp[0].dtype == "fp32"
    assert w2.optimizer_params == c2.params_per_rank // 2
    assert w2.optimizer_bytes == w2.optimizer_params * (24 + 4 + 2)


def test_attention_flops_full_and_causal():
    w = workload(alcf_1t())
    fwd = next(a for a in w.attention if a.phase == "fwd" and a.name == "attention_core")
    assert (fwd.batch, fwd.heads, fwd.seq, fwd.head_dim) == (1, 16, 2048, 128)
    assert fwd.flop == 4 * 1 * 16 * 2048 * 2048 * 128
    assert fwd.flop_causal * 2 == fwd.flop


def test_layer_flops_match_the_textbook_count():
    # 24·s·d² + 4·s²·d per layer forward for a 4d MLP; here QKV 6sd², proj 2sd², MLP 6·s·d·f
    c = with_layout(tiny(), recompute="none")
    m = c.model
    w = workload(c)
    T, d, f, b, s = w.tokens, m.hidden, m.ffn_hidden, c.parallel.micro_batch, m.seq_len
    expected_fwd = 2 * T * d * (3 * d + d + 3 * f) + 4 * b * s * s * d
    fwd = sum(g.flop for g in w.gemms if g.phase == "fwd") + sum(a.flop for a in w.attention if a.phase == "fwd")
    assert fwd == expected_fwd


def test_the_workload_owns_every_multiplicity():
    """Issue 19: the recompute's memory-bound ops, the ZeRO-2/3 counts, the stages' extras and
    the host's phases are the workload's, not re-derived by the predictor."""
    from microbench.model.workload import HostPath, step_phase
    full = workload(with_layout(tiny(), recompute="full"))
    assert {op.name for op in full.memops if op.phase == "recompute"} == \
        {op.name for op in full.memops if op.phase == "fwd"}
    assert [h.phase for h in full.host] == ["fwd", "recompute", "bwd"]
    assert [h.phase for h in workload(with_layout(tiny(), recompute="none")).host] == ["fwd", "bwd"]
    sel = workload(with_layout(tiny(), recompute="selective"))
    assert {op.name for op in sel.memops if op.phase == "recompute"} == {"softmax"}  # the core's own
    z = with_layout(tiny(), dp=2, zero_stage=2, global_batch=16)  # 4 micro-batches per replica
    P = z.stage_params(0)
    assert [(op.name, op.count, op.elements) for op in workload(z).step] == [
        ("dp_allreduce", 4, P), ("dp_allgather", 1, P), ("copy_fresh", 8, P), ("copy", 4, P), ("copy_fresh", 4, P // 2),
        ("copy", 4, P // 2), ("adamw", 1, P // 2)]
    z3 = {op.name: op.count for op in workload(with_layout(z, zero_stage=3)).step}
    assert z3["dp_reduce_scatter"] == 4 and z3["dp_allgather"] == 8
    tp2 = workload(with_layout(tiny(), tp=2))
    assert [(op.name, op.phase, getattr(op, "count", 1)) for op in tp2.first] == [
        ("embedding", "fwd", 1), ("embedding", "bwd", 2), ("embedding_tp_reduce", "fwd", 1),
        ("embedding_tp_reduce_sync", "fwd", 1)]  # each TP reduction with its in-step cost (issue 20)
    assert [(op.name, step_phase(op)) for op in tp2.last][-2:] == [("lm_head_tp_reduce", "bwd"),
                                                                   ("lm_head_tp_reduce_sync", "bwd")]
    assert isinstance(full.layer[-1], HostPath)


def test_memory_fits_an_aurora_tile_for_the_1t_run():
    mem = memory_bytes(alcf_1t())
    assert all(v > 0 for v in mem.values())
    assert sum(mem.values()) / 2**30 < 64  # a Max 1550 tile has 64 GB of HBM


def test_interleaving_keeps_more_activations_in_flight():
    base = with_layout(alcf_1t(), recompute="none")
    one = memory_bytes(base, stage=0)["activations"]
    two = memory_bytes(with_layout(base, interleave=2), stage=0)["activations"]
    # (2·(pp−1) + (v−1)·pp + 1)/v = (126 + 64 + 1)/2 = 95.5 vs pp = 64 stage micro-batches
    assert two / one == pytest.approx(95.5 / 64, rel=1e-9)


def test_how_deepspeed_and_flat_buffers_reduce_the_gradient():
    """Read from DeepSpeed 0.18 (stage_1_and_2.py: average_tensor → allreduce_and_scatter →
    allreduce_bucket → dist.all_reduce; the engine's allreduce_bucket at ZeRO-0) and seen in a
    profiled Megatron-DeepSpeed run (mds-cpu, seq 256, dp2, gbs 8: ZeRO-1 one all_reduce of all
    18,878,976 gradient elements per iteration, ZeRO-2 four, and one all_gather). Which copies
    write a buffer allocated for them, from the profile hook's stacks of the same runs: ZeRO-0
    one flatten (engine.allreduce_bucket); ZeRO-1/2 per reduction the bucket copy
    (reduce_independent_p_g_buckets_and_remove_grads, into the bucket setup_buckets allocates),
    the flatten (allreduce_bucket) and the partition copy (copy_grads_in_partition). The
    reference step's flat buffers reduce-scatter under ZeRO and copy nothing."""
    import dataclasses
    base = with_layout(tiny(), dp=2, global_batch=16)  # 4 micro-batches per replica
    P = base.stage_params(0)

    def step(zero, sync="deepspeed"):
        par = dataclasses.replace(base.parallel, zero_stage=zero, grad_sync=sync)
        return [(op.name, op.count, op.bytes) for op in workload(dataclasses.replace(base, parallel=par)).step
                if op.name != "adamw"]
    g, w = 4, 4  # fp32 gradients, tiny's fp32 weights
    assert step(0) == [("dp_allreduce", 1, P * g), ("copy_fresh", 1, 2 * P * g), ("copy", 2, 2 * P * g)]
    assert step(1) == [("dp_allreduce", 1, P * g), ("dp_allgather", 1, P * w), ("copy_fresh", 2, 2 * P * g),
                       ("copy", 1, 2 * P * g), ("copy_fresh", 1, P * g), ("copy", 1, P * g)]
    assert step(0, "flat") == [("dp_allreduce", 1, P * g)]
    assert step(1, "flat") == [("dp_reduce_scatter", 1, P * g), ("dp_allgather", 1, P * w)]
    assert step(2, "flat") == [("dp_reduce_scatter", 4, P * g), ("dp_allgather", 1, P * w)]
    with pytest.raises(ValueError, match="grad_sync must be deepspeed or flat, got 'nccl'"):
        dataclasses.replace(base.parallel, grad_sync="nccl")
