"""The published formulas the predictor reports, in one place, each with its source.

Nothing here knows about systems or measurements: these are pure functions of a
:class:`~microbench.model.config.TrainConfig` and a step time (or of α and β).
"""
from __future__ import annotations

from microbench.model.config import TrainConfig


def fom(cfg: TrainConfig, step_s: float) -> float:
    """The ALCF-4 1T benchmark's figure of merit, exactly as defined (DESIGN.md):
    FOM = (6·s·d² + s²·d)·b·L / T, b the global batch, T the step time in seconds.

    It is one twelfth of the model FLOP/s of a 4d-MLP model; report it as defined.
    """
    if step_s <= 0:
        raise ValueError(f"step time must be > 0 s, got {step_s!r}")
    m = cfg.model
    s, d, L, b = m.seq_len, m.hidden, m.num_layers, cfg.parallel.global_batch
    return (6 * s * d * d + s * s * d) * b * L / step_s


def seed_step_time(cfg: TrainConfig, *, alpha: float, beta: float) -> float:
    """The benchmark's own two-term model (DESIGN.md, "The benchmark's model and FOM"):
    t = α·b·L·(36·s·d² + 6·s²·d)/(PP·TP) + β·4·b·L·s·d/PP,
    α seconds per multiply-add per device, β seconds per element of a TP allreduce of [s, d].
    It ignores the bubble, recompute, the LM head, DP and PP communication."""
    m, p = cfg.model, cfg.parallel
    s, d, L, b = m.seq_len, m.hidden, m.num_layers, p.global_batch
    compute = alpha * b * L * (36 * s * d * d + 6 * s * s * d) / (p.pp * p.tp)
    comm = beta * 4 * b * L * s * d / p.pp
    return compute + comm


def bubble_fraction(*, pp: int, num_microbatches: int, interleave: int = 1) -> float:
    """Pipeline bubble as a fraction of the ideal (bubble-free) time: (p−1)/(v·m).
    1F1B: Narayanan et al. 2021 (PipeDream-Flush, §2.2); interleaved: same paper, §2.2.2."""
    if pp < 1 or num_microbatches < 1 or interleave < 1:
        raise ValueError(f"pp({pp}), num_microbatches({num_microbatches}) and "
                         f"interleave({interleave}) must be ≥ 1")
    return (pp - 1) / (interleave * num_microbatches)


def time_to_train_s(cfg: TrainConfig, step_s: float, tokens: float) -> float:
    """Seconds to consume ``tokens`` at global_batch·seq_len tokens per step."""
    per_step = cfg.parallel.global_batch * cfg.model.seq_len
    return tokens / per_step * step_s
