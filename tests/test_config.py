"""Config validation: errors name the field and the numbers."""
import dataclasses

import pytest

from microbench.model.config import (PRESETS, ModelConfig, ParallelConfig, TrainConfig, alcf_1t,
                               alcf_1t_readme, preset, with_layout)


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.model.name == name
        assert cfg.parallel.num_microbatches >= 1


def test_alcf_1t_matches_the_aurora_run():
    c = alcf_1t()
    m, p = c.model, c.parallel
    assert (m.num_layers, m.hidden, m.num_heads, m.ffn_hidden, m.seq_len, m.vocab_size) == \
        (128, 24576, 192, 98304, 2048, 32256)
    assert m.head_dim == 128 and m.gated_mlp and m.norm == "rmsnorm"
    assert (p.tp, p.pp, p.dp, p.micro_batch, p.global_batch) == (12, 64, 1, 1, 512)
    assert p.world_size == 768 and p.num_microbatches == 512
    assert p.recompute == "full" and p.zero_stage == 1 and p.grad_dtype == "fp32"
    assert c.layers_per_stage == 2


def test_readme_shape_uses_a_head_count_that_divides_hidden_and_tp():
    m = alcf_1t_readme().model
    assert m.hidden == 25872 and m.hidden % m.num_heads == 0 and m.num_heads % 12 == 0
    assert "132 heads" in alcf_1t_readme().note


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known: alcf-1t"):
        preset("gpt5")


@pytest.mark.parametrize("change, pattern", [
    (dict(tp=7), r"num_heads\(192\) % tp\(7\)"),
    (dict(tp=5, pp=1), r"num_heads\(192\) % tp\(5\)"),
    (dict(pp=3), r"num_layers\(128\) % \(pp\(3\) × interleave\(1\) = 3\)"),
])
def test_layout_errors_name_the_numbers(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        with_layout(alcf_1t(), **change)


def test_ffn_not_divisible_by_tp():
    with pytest.raises(ValueError, match=r"ffn_hidden\(100\) % tp\(8\)"):
        TrainConfig(model=ModelConfig(num_layers=2, hidden=64, num_heads=8, ffn_hidden=100,
                                      seq_len=16, vocab_size=64),
                    parallel=ParallelConfig(tp=8))


def test_global_batch_must_divide_by_mbs_times_dp():
    with pytest.raises(ValueError, match=r"global_batch\(10\) % \(micro_batch\(2\) × dp\(3\) = 6\)"):
        ParallelConfig(dp=3, micro_batch=2, global_batch=10)


def test_world_size_check_gives_the_equation():
    p = ParallelConfig(tp=12, pp=64, dp=2, global_batch=2)
    with pytest.raises(ValueError, match=r"tp\(12\) × pp\(64\) × dp\(2\) = 1536 ≠ world 768"):
        p.check_world(768)


def test_non_positive_and_bad_choices():
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        ModelConfig(num_layers=0, hidden=8, num_heads=1, ffn_hidden=8, seq_len=8, vocab_size=8)
    with pytest.raises(ValueError, match="recompute"):
        ParallelConfig(recompute="some")
    with pytest.raises(ValueError, match=r"hidden\(100\) % num_heads\(3\)"):
        ModelConfig(num_layers=1, hidden=100, num_heads=3, ffn_hidden=8, seq_len=8, vocab_size=8)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        alcf_1t().model.hidden = 1


def test_parameter_count_of_alcf_1t_by_hand():
    d, f, L, V = 24576, 98304, 128, 32256
    layer = 4 * d * d + 3 * d * f + 2 * d
    assert alcf_1t().model.num_params == L * layer + 2 * V * d + d
    # per rank of the last stage: 2 layers sharded 12 ways (norms replicated) + LM head shard
    c = alcf_1t()
    assert c.stage_params(63) == 2 * ((layer - 2 * d) // 12 + 2 * d) + V * d // 12 + d
    assert c.params_per_rank == max(c.stage_params(0), c.stage_params(63))


def test_with_layout_keeps_model_and_rescales_batch():
    c = with_layout(alcf_1t(), tp=2, pp=1, dp=2)
    assert c.model == alcf_1t().model
    assert c.parallel.num_microbatches == 512 and c.parallel.global_batch == 1024
