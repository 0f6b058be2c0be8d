"""Step-time prediction: compose the workload's operations, priced by a system profile.

Per pipeline stage and micro-batch: forward and backward time of the stage's layers (GEMMs,
attention core, memory-bound ops, TP collectives exposed as the profile says, recompute),
pipeline p2p on the critical path, first/last-stage extras (embedding, LM head, loss). The
step is the 1F1B (or interleaved) schedule over the slowest stage,
(m + (p−1)/v)·(t_f + t_b) (Narayanan et al. 2021, §2.2), plus the exposed DP gradient sync
and the optimizer step. Every shape and byte count comes from
``microbench.workload.workload(cfg)`` and ``memory_bytes(cfg)``; nothing is re-derived here.

CLI: ``python -m analysis.predict --model alcf-1t --system aurora [--json]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from microbench.cli import ArgumentParser
from microbench import workload as _wl
from microbench.config import PRESETS, ModelConfig, ParallelConfig, TrainConfig, preset, with_layout

from . import formulas
from .profile import SystemProfile, group_placement, load_profile

GIB = 2 ** 30
COMPONENTS = ("gemm", "attention", "memops", "recompute", "tp_comm", "pp_p2p", "embedding_head",
              "overhead", "bubble", "dp_sync", "optimizer")


@dataclass
class Prediction:
    config: TrainConfig
    system: str
    step_time_s: float
    breakdown_s: dict[str, float]
    """Components that sum to the step (see COMPONENTS)."""
    stage_fwd_s: float
    """Forward of one micro-batch on the slowest stage (its extras and p2p included)."""
    stage_bwd_s: float
    num_microbatches: int
    bubble_fraction: float
    tokens_per_s: float
    model_tflops_per_device: float
    mfu: float
    fom: float
    memory_gib_per_device: dict[str, float]
    fits_in_memory: bool
    seed_model: dict[str, float]
    sources: dict[str, str]
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        m, p = self.config.model, self.config.parallel
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}
        d["model"] = dataclasses.asdict(m)
        d["parallel"] = dataclasses.asdict(p)
        d["world_size"] = p.world_size
        return d


# --- framework terms (issue 11): what a training framework adds beyond the probed operations ---
@dataclass(frozen=True)
class FrameworkTerms:
    """The framework's own host time per step, *measured* by running that framework at the
    step's layout, layer count and micro-batch count with the model narrowed, less the probes'
    price of its operations (``analysis.crosscheck_megatron.framework_probe``): Python layers and autograd
    between kernels, the pipeline engine's schedule and its p2p bookkeeping, the DeepSpeed/ZeRO
    step's fixed cost, data loading. Priced per layer per micro-batch so it scales with the
    configuration it was measured at only through ``layers_per_stage × num_microbatches``."""

    per_layer_microbatch_s: float
    """Host seconds per layer per micro-batch (fwd + bwd) on the bottleneck stage."""
    source: str
    """Provenance: which run measured it, at which shape."""

    def step_s(self, cfg: TrainConfig) -> float:
        return self.per_layer_microbatch_s * cfg.layers_per_stage * cfg.parallel.num_microbatches
# --- end framework terms ---


def _layer(w: _wl.Workload, profile: SystemProfile, cfg: TrainConfig) -> dict[str, float]:
    """Seconds per layer per micro-batch, by phase and component (one rank)."""
    out = dict.fromkeys(("gemm_fwd", "gemm_bwd", "gemm_re", "attn_fwd", "attn_bwd", "attn_re",
                         "mem_fwd", "mem_bwd", "mem_re", "tp_fwd", "tp_bwd", "tp_re"), 0.0)
    for g in w.gemms:
        key = {"fwd": "gemm_fwd", "dgrad": "gemm_bwd", "wgrad": "gemm_bwd", "recompute": "gemm_re"}[g.phase]
        out[key] += g.count * profile.gemm_time_s(g)
    for a in w.attention:
        key = "attn_re" if a.name.endswith("recompute") else f"attn_{a.phase}"
        out[key] += profile.attention_time_s(a)
    fused = profile.attention_fused
    for op in w.memops:
        if op.explicit_attention_only and fused:
            continue
        t = op.count * profile.memop_time_s(op)
        out[f"mem_{op.phase}"] += t
        if op.phase == "fwd" and cfg.parallel.recompute == "full":
            out["mem_re"] += t  # the whole forward runs again before the backward
        elif op.phase == "fwd" and cfg.parallel.recompute == "selective" and op.explicit_attention_only:
            out["mem_re"] += t  # selective recompute re-runs the attention core (softmax with it)
    tp = group_placement(cfg, "tp", ranks_per_node=profile.ranks_per_node)
    for c in w.collectives:
        t = c.count * profile.collective_time_s(c, crosses_nodes=tp.crosses_nodes, num_groups=tp.num_groups,
                                                ranks_per_node_in_group=tp.ranks_per_node_in_group)
        t *= profile.overlap("tp_wgrad" if c.overlappable else "tp")
        out[{"fwd": "tp_fwd", "bwd": "tp_bwd", "recompute": "tp_re"}.get(c.phase, "tp_bwd")] += t
    return out


def _tp_one(w: _wl.Workload, profile: SystemProfile, cfg: TrainConfig) -> float:
    """One forward TP reduction of [T, d] (the vocab-parallel embedding's, or the LM head
    input's gradient): the first forward collective of the layer, priced once."""
    tp = group_placement(cfg, "tp", ranks_per_node=profile.ranks_per_node)
    fwd = [c for c in w.collectives if c.phase == "fwd" and c.kind in ("allreduce", "reduce_scatter")]
    if not fwd:
        return 0.0
    return profile.collective_time_s(fwd[0], crosses_nodes=tp.crosses_nodes, num_groups=tp.num_groups,
                                     ranks_per_node_in_group=tp.ranks_per_node_in_group) * profile.overlap("tp")


def seed_model(cfg: TrainConfig, profile: SystemProfile, *, w: _wl.Workload | None = None) -> dict[str, float]:
    """The benchmark's two-term formula with α and β from this profile.

    α (s per multiply-add per device): the profile's achieved rate on the layer's GEMMs
    (fwd, dgrad, wgrad), α = 2·Σt/ΣFLOP. β (s per element): the TP allreduce of [mbs·s, d]
    from the workload, time/elements (with SP: its allgather + reduce-scatter pair); 0 with TP 1.
    """
    w = w or _wl.workload(cfg)
    big = [g for g in w.gemms if g.phase in ("fwd", "dgrad", "wgrad")]
    t = sum(g.count * profile.gemm_time_s(g) for g in big)
    flop = sum(g.count * g.flop for g in big)
    alpha = 2 * t / flop
    beta = 0.0
    if cfg.parallel.tp > 1:
        tp = group_placement(cfg, "tp", ranks_per_node=profile.ranks_per_node)
        fwd = [c for c in w.collectives if c.phase == "fwd"]
        per = sum(profile.collective_time_s(c, crosses_nodes=tp.crosses_nodes, num_groups=tp.num_groups,
                                            ranks_per_node_in_group=tp.ranks_per_node_in_group) for c in fwd)
        beta = per / fwd[0].elements
    return {"alpha": alpha, "beta": beta, "step_time_s": formulas.seed_step_time(cfg, alpha=alpha, beta=beta)}


def predict(cfg: TrainConfig, profile: SystemProfile, *, dp_overlap: bool = True,
            p2p_scatter_gather: bool = False, framework: FrameworkTerms | None = None) -> Prediction:
    """Predicted step time of ``cfg`` on ``profile`` (see module docstring for the model).

    ``framework``: measured costs of the training framework itself (see FrameworkTerms),
    added as the ``framework`` component; none by default."""
    p = cfg.parallel
    w = _wl.workload(cfg, p2p_scatter_gather=p2p_scatter_gather)
    Ls = cfg.layers_per_stage
    lay = _layer(w, profile, cfg)
    m, v = p.num_microbatches, p.interleave

    # Pipeline p2p: one activation forward, one gradient backward per micro-batch per
    # boundary (× v chunks interleaved), blocking in 1F1B, so on the critical path.
    pp_pl = group_placement(cfg, "pp", ranks_per_node=profile.ranks_per_node)
    p2p_f = p2p_b = 0.0
    for c in w.p2p:
        t = c.count * profile.p2p_time_s(c, crosses_nodes=pp_pl.crosses_nodes)
        if c.phase == "fwd":
            p2p_f += t
        else:
            p2p_b += t

    # First stage: embedding lookup (+ its backward scatter, same bytes twice) and its TP
    # reduction. Last stage: LM head GEMMs, final norm (fwd + 2× bwd), cross-entropy.
    tp1 = _tp_one(w, profile, cfg)
    emb = [op for op in w.head_memops if op.name == "embedding"]
    first_f = sum(profile.memop_time_s(op) for op in emb) + tp1
    first_b = sum(2 * profile.memop_time_s(op) for op in emb)
    last_f = sum(profile.gemm_time_s(g) for g in w.head_gemms if g.phase == "fwd")
    last_b = sum(profile.gemm_time_s(g) for g in w.head_gemms if g.phase != "fwd") + tp1
    for op in w.head_memops:
        if op.name == "final_norm":
            last_f += profile.memop_time_s(op)
            last_b += profile.bytes_time_s(2 * op.bytes, op=op.name)
        elif op.name == "cross_entropy":
            last_f += profile.memop_time_s(op)

    parts_f = {"gemm": lay["gemm_fwd"], "attention": lay["attn_fwd"], "memops": lay["mem_fwd"],
               "tp_comm": lay["tp_fwd"]}
    parts_b = {"gemm": lay["gemm_bwd"], "attention": lay["attn_bwd"], "memops": lay["mem_bwd"],
               "tp_comm": lay["tp_bwd"],
               "recompute": lay["gemm_re"] + lay["attn_re"] + lay["mem_re"] + lay["tp_re"]}
    layers = {k: Ls * (parts_f.get(k, 0.0) + parts_b.get(k, 0.0)) for k in set(parts_f) | set(parts_b)}
    layers["overhead"] = Ls * profile.layer_overhead_time_s()
    layers_f = Ls * sum(parts_f.values())
    stages = {"first": (first_f, first_b), "last": (last_f, last_b)}
    if p.pp == 1:
        stages = {"only": (first_f + last_f, first_b + last_b)}
    name, (ex_f, ex_b) = max(stages.items(), key=lambda kv: sum(kv[1]))
    per_mb = dict(layers, pp_p2p=p2p_f + p2p_b, embedding_head=ex_f + ex_b)
    t_f = layers_f + ex_f + p2p_f
    t_b = sum(per_mb.values()) - t_f
    stage_mb = t_f + t_b
    bubble_frac = formulas.bubble_fraction(pp=p.pp, num_microbatches=m, interleave=v)

    br = dict.fromkeys(COMPONENTS, 0.0)
    for k, t in per_mb.items():
        br[k] += m * t
    br["bubble"] = bubble_frac * m * stage_mb

    # DP gradient sync: reduce-scatter/allreduce buckets overlap the last micro-batch's
    # backward (exposed = max(t − window, f_exposed·t)); the ZeRO allgather follows the
    # optimizer and is exposed. ZeRO-3 gathers parameters in every forward and backward.
    # Everything that can hide shares the same links and one window: the collectives'
    # times add up before the window is subtracted (two collectives cannot both hide
    # behind the same seconds of compute).
    dp_pl = group_placement(cfg, "dp", ranks_per_node=profile.ranks_per_node)
    hideable, window = 0.0, 0.0
    for c in w.dp:
        t = profile.collective_time_s(c, crosses_nodes=dp_pl.crosses_nodes, num_groups=dp_pl.num_groups,
                                      ranks_per_node_in_group=dp_pl.ranks_per_node_in_group)
        if c.kind == "allgather" and p.zero_stage >= 3:
            hideable += t * 2 * m
            window = max(window, m * stage_mb)
        elif c.overlappable and p.zero_stage >= 2:
            # ZeRO-2/3 reduce-scatter the gradients in every micro-batch's backward
            # (DeepSpeed's partitioned gradients cannot accumulate unreduced)
            hideable += t * m
            window = max(window, m * t_b)
        elif c.overlappable:
            hideable += t
            window = max(window, t_b)
        else:
            br["dp_sync"] += t
    if dp_overlap and window > 0:
        hideable = max(hideable - window, profile.overlap("dp") * hideable)
    br["dp_sync"] += hideable
    br["optimizer"] = profile.bytes_time_s(w.optimizer_bytes, op="adamw")
    if framework is not None:  # --- framework terms (issue 11) ---
        br["framework"] = framework.step_s(cfg)
    step = sum(br.values())

    # The first stage holds the most micro-batches in flight, the last the LM head: take the
    # stage whose total is largest (memory_bytes prices each stage).
    mem = max((_wl.memory_bytes(cfg, stage=s) for s in {0, p.pp - 1}), key=lambda d: sum(d.values()))
    mem_gib = {k: v / GIB for k, v in mem.items()}
    mem_gib["total"] = sum(mem.values()) / GIB
    mem_gib["capacity"] = profile.device_memory_gib
    tflops = formulas.megatron_tflops(cfg, step)
    return Prediction(
        config=cfg, system=profile.name, step_time_s=step, breakdown_s=br,
        stage_fwd_s=t_f, stage_bwd_s=t_b, num_microbatches=m, bubble_fraction=bubble_frac,
        tokens_per_s=p.global_batch * cfg.model.seq_len / step,
        model_tflops_per_device=tflops, mfu=tflops / profile.peak_tflops,
        fom=formulas.fom(cfg, step), memory_gib_per_device=mem_gib,
        fits_in_memory=mem_gib["total"] <= profile.device_memory_gib,
        seed_model=seed_model(cfg, profile, w=w), sources=profile.sources(),
        placement={ax: dataclasses.asdict(group_placement(cfg, ax, ranks_per_node=profile.ranks_per_node))
                   for ax in ("tp", "dp", "pp")} | {"bottleneck_stage": {"name": name}})


# ---------------------------------------------------------------------------------------------
# CLI

def add_config_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", help=f"preset: {', '.join(PRESETS)}")
    for flag in ("layers", "hidden", "heads", "kv-heads", "ffn", "seq", "vocab"):
        g.add_argument(f"--{flag}", type=int)
    g.add_argument("--gated", action="store_true", default=None, help="SwiGLU MLP (three matrices)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    lay = ap.add_argument_group("layout")
    for flag in ("tp", "pp", "dp", "mbs", "gbs"):
        lay.add_argument(f"--{flag}", type=int)
    lay.add_argument("--interleave", type=int, metavar="V")
    lay.add_argument("--recompute", choices=("none", "selective", "full"))
    lay.add_argument("--sequence-parallel", action="store_true", default=None)
    lay.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    s = ap.add_argument_group("system")
    s.add_argument("--system", help="shipped spec (analysis/systems/NAME.yaml) or a YAML path")
    s.add_argument("--profile", nargs="+", metavar="RUN_DIR", help="measured probe results")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    layout = dict(tp=a.tp, pp=a.pp, dp=a.dp, micro_batch=a.mbs, global_batch=a.gbs,
                  interleave=a.interleave, recompute=a.recompute,
                  sequence_parallel=a.sequence_parallel, zero_stage=a.zero)
    dims = dict(num_layers=a.layers, hidden=a.hidden, num_heads=a.heads, num_kv_heads=a.kv_heads,
                ffn_hidden=a.ffn, seq_len=a.seq, vocab_size=a.vocab, gated_mlp=a.gated, dtype=a.dtype)
    if a.model:
        return with_layout(preset(a.model), **dims, **layout)
    missing = [f"--{k}" for k, v in (("layers", a.layers), ("hidden", a.hidden), ("heads", a.heads),
                                     ("ffn", a.ffn), ("seq", a.seq), ("vocab", a.vocab)) if v is None]
    if missing:
        raise ValueError(f"give --model PRESET ({', '.join(PRESETS)}) or all of {' '.join(missing)}")
    model = ModelConfig(**{k: v for k, v in dims.items() if v is not None} | {"gated_mlp": bool(a.gated)})
    par = {k: v for k, v in layout.items() if v is not None}
    par.setdefault("global_batch", par.get("micro_batch", 1) * par.get("dp", 1))
    return TrainConfig(model=model, parallel=ParallelConfig(**par))


def format_table(pr: Prediction) -> str:
    cfg = pr.config
    p = cfg.parallel
    lines = [f"{cfg.model.name} on {pr.system}: tp {p.tp} × pp {p.pp} × dp {p.dp} = {p.world_size} ranks, "
             f"mbs {p.micro_batch}, gbs {p.global_batch} ({pr.num_microbatches} micro-batches), "
             f"interleave {p.interleave}, recompute {p.recompute}, sp {p.sequence_parallel}, zero {p.zero_stage}",
             "", f"{'component':<16}{'seconds':>12}{'share':>9}"]
    for k, v in pr.breakdown_s.items():
        lines.append(f"{k:<16}{v:>12.4f}{v / pr.step_time_s:>8.1%}")
    lines.append(f"{'step':<16}{pr.step_time_s:>12.4f}{1:>8.0%}")
    mem = pr.memory_gib_per_device
    lines += ["", f"stage fwd / bwd per micro-batch  {pr.stage_fwd_s * 1e3:.2f} / {pr.stage_bwd_s * 1e3:.2f} ms; "
              f"bubble {pr.bubble_fraction:.1%}",
              f"tokens/s                         {pr.tokens_per_s:,.0f}",
              f"model TFLOP/s per device         {pr.model_tflops_per_device:.1f} (Megatron formula); "
              f"MFU {pr.mfu:.1%}",
              f"FOM (6sd²+s²d)·b·L/T             {pr.fom:.4g}",
              f"seed model (α={pr.seed_model['alpha']:.3g} s/MAC, β={pr.seed_model['beta']:.3g} s/elem)  "
              f"{pr.seed_model['step_time_s']:.4f} s ({pr.seed_model['step_time_s'] / pr.step_time_s - 1:+.1%} "
              f"vs this prediction)",
              "memory GiB/device                " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items())
              + ("" if pr.fits_in_memory else "  ** DOES NOT FIT **"),
              "sources                          " + ", ".join(f"{k}={v}" for k, v in pr.sources.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.predict", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--no-dp-overlap", action="store_true", help="expose the whole DP gradient sync")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
        profile = load_profile(system=a.system, profile_dirs=a.profile)
        pr = predict(cfg, profile, dp_overlap=not a.no_dp_overlap)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(pr.to_dict()) if a.json else format_table(pr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
