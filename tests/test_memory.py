"""The per-GPU memory estimate (microbench.model.memory.memory_bytes) against published figures.

Sources:
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv 2205.05198): abstract — sequence parallelism with selective recomputation "reduces
  activation memory by 5x"; Table 3 — the 22B / 175B / 530B / 1T GPT configurations (heads,
  hidden, layers, TP 8, PP 1/8/35/64, sequence 2048, vocabulary 51,200), trained on A100 80 GB.
* Megatron-LM, docs/source/api-guide/dist_optimizer.md — bytes per parameter of weights +
  gradients + optimizer state: fp16 params with fp16 grads 20 (distributed optimizer 4 + 16/d),
  bf16 params with fp32 grads 18 (6 + 12/d), fp32 16 (8 + 8/d).
* vTrain ground_truth_multi.csv — every one of its 109 layouts ran (skips when ../shared is absent).
"""
import dataclasses
from pathlib import Path

import pytest

from analysis.calibrate import read_cases
from analysis.predict import predict
from analysis.spec import SpecProfile
from microbench.model.config import ModelConfig, ParallelConfig, TrainConfig
from microbench.model.memory import memory_bytes

GIB = 2 ** 30
VTRAIN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "vtrain_ground_truth_multi.csv"
# Korthikanti et al. 2022, Table 3: (heads, hidden, layers, pp) with TP 8, seq 2048, vocab 51,200.
KORTHIKANTI = {"22B": (64, 6144, 48, 1), "175B": (96, 12288, 96, 8), "530B": (128, 20480, 105, 35),
               "1T": (160, 25600, 128, 64)}


def _gpt(size: str, **par) -> TrainConfig:
    heads, hidden, layers, pp = KORTHIKANTI[size]
    model = ModelConfig(num_layers=layers, hidden=hidden, num_heads=heads, ffn_hidden=4 * hidden, gated_mlp=False,
                        seq_len=2048, vocab_size=51200, norm="layernorm", dtype="bf16", dropout=True)
    return TrainConfig(model=model, parallel=ParallelConfig(tp=8, pp=pp, dp=1, micro_batch=1, global_batch=pp * 8,
                                                            **par))


@pytest.mark.parametrize("size", KORTHIKANTI)
def test_sequence_parallel_and_selective_recompute_cut_activations_about_5x(size):
    base = memory_bytes(_gpt(size, recompute="none"))["activations"]
    present = memory_bytes(_gpt(size, recompute="selective", sequence_parallel=True))["activations"]
    assert 4.0 <= base / present <= 6.5  # "reduces activation memory by 5x" (abstract)


@pytest.mark.parametrize("size", ["175B", "530B", "1T"])
def test_korthikanti_layouts_fit_an_80gb_a100(size):
    """They trained these layouts (micro-batch 1) on A100 80 GB without recomputing whole layers."""
    pr = predict(_gpt(size, recompute="selective", sequence_parallel=True), SpecProfile.from_yaml("dgx-a100-80gb"))
    assert pr.fits_in_memory, pr.memory_gib_per_device


@pytest.mark.parametrize("dtype,grad,full,dist", [("fp16", "fp16", 20, (4, 16)), ("bf16", "fp32", 18, (6, 12)),
                                                   ("fp32", "fp32", 16, (8, 8))])
def test_bytes_per_parameter_match_megatron_distributed_optimizer_table(dtype, grad, full, dist):
    model = ModelConfig(num_layers=2, hidden=512, num_heads=8, ffn_hidden=2048, seq_len=128, vocab_size=1024,
                        dtype=dtype)
    dp = 8
    for zero, expect in ((0, full), (1, dist[0] + dist[1] / dp)):
        cfg = TrainConfig(model=model, parallel=ParallelConfig(dp=dp, global_batch=dp, zero_stage=zero, grad_dtype=grad))
        m = memory_bytes(cfg)
        per_param = (m["weights"] + m["gradients"] + m["optimizer"]) / cfg.stage_params(0)
        assert per_param == pytest.approx(expect, rel=1e-3)


@pytest.mark.skipif(not VTRAIN.is_file(), reason="../shared/validation absent")
def test_every_vtrain_layout_fits_the_gpu_it_ran_on():
    """All 109 vTrain runs ran, so none may be reported as not fitting. The file implies 80 GB
    A100s: plain Megatron (no distributed optimizer) needs more than 40 GiB for some layouts."""
    cases = read_cases(VTRAIN)
    a100_80 = SpecProfile.from_yaml("dgx-a100-80gb")
    totals = []
    for c in cases:
        pr = predict(c.cfg, a100_80, p2p_scatter_gather=c.p2p_scatter_gather)
        assert pr.fits_in_memory, (c.size, c.cfg.parallel, pr.memory_gib_per_device)
        totals.append(pr.memory_gib_per_device["total"])
    assert max(totals) > 40  # so these runs could not have been on the 40 GB part


def test_dropout_is_a_memory_pass_of_the_unfused_attention_only():
    """GPT-3-style dropout (Megatron's default 0.1) adds a pass over the b·a·s² probabilities
    that flash attention fuses away; Llama-style models (no dropout) have none."""
    from microbench.model.workload import workload
    cfg = _gpt("175B", recompute="full")
    names = {op.name: op for op in workload(cfg).memops}
    assert names["attention_dropout"].explicit_attention_only
    no = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=False))
    assert "attention_dropout" not in {op.name for op in workload(no).memops}
    assert memory_bytes(no)["activations"] < memory_bytes(cfg)["activations"]
