"""Step-time prediction: compose the workload's operations, priced by a system profile.

Per pipeline stage and micro-batch: forward and backward time of the stage's layers (GEMMs,
attention core, memory-bound ops, TP collectives exposed as the profile says, recompute),
pipeline p2p on the critical path, first/last-stage extras (embedding, LM head, loss). The
step is the 1F1B (or interleaved) schedule: m micro-batches at the slowest stage's pace plus
the fill and drain, (p−1)/v·(t_f + t_b) for equal stages (Narayanan et al. 2021, §2.2); in
1F1B the fill passes through the other stages, so it is priced with their time, not the
bottleneck's. Then the exposed DP gradient sync and the optimizer step. Every shape and
byte count comes from ``microbench.workload.workload(cfg)`` and ``memory_bytes(cfg)``; nothing is re-derived here.

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
from .provenance import WORDS, Ledger, seconds_by_word, summarise, word_of

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
    """Idle fill and drain over the steady-state work, bubble / (m·(t_f + t_b)): (p−1)/(v·m)
    for equal stages, less where the bottleneck stage carries extras the others lack."""
    tokens_per_s: float
    model_tflops_per_device: float
    mfu: float
    fom: float
    memory_gib_per_device: dict[str, float]
    fits_in_memory: bool
    seed_model: dict[str, float]
    sources: dict[str, str]
    """Step component (and ``peak``, ``memory``, ``overlap.*``) → provenance (analysis.provenance):
    measured / extrapolated (from what) / specified (file: key); several joined by '; '."""
    provenance_s: dict[str, dict[str, float]] = field(default_factory=dict)
    """Step component → {source: seconds of the step}; each sums to the component's seconds."""
    seconds_by_provenance: dict[str, float] = field(default_factory=dict)
    """measured / extrapolated / specified → seconds of the step (they sum to the step)."""
    profile_sources: dict[str, str] = field(default_factory=dict)
    """The profile's own sources (what it measured, as a whole)."""
    notes: list[str] = field(default_factory=list)
    """Rows left out and the like, from the profile."""
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        m, p = self.config.model, self.config.parallel
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}
        d["model"] = dataclasses.asdict(m)
        d["parallel"] = dataclasses.asdict(p)
        d["world_size"] = p.world_size
        return d


class _Pricer:
    """Prices operations on a profile and books each time with its source in a ledger
    (analysis.provenance), under the step component it belongs to."""

    def __init__(self, profile: SystemProfile, ledger: Ledger):
        self.p, self.ledger = profile, ledger

    def gemm(self, g: _wl.Gemm, comp: str, times: float = 1.0) -> float:
        return self.ledger.add(comp, self.p.gemm_source(g), times * self.p.gemm_time_s(g))

    def attention(self, a: _wl.Attention, comp: str) -> float:
        return self.ledger.add(comp, self.p.attention_source(a), self.p.attention_time_s(a))

    def nbytes(self, n: float, op: str, comp: str, times: float = 1.0) -> float:
        return self.ledger.add(comp, self.p.bytes_source(op=op, nbytes=n), times * self.p.bytes_time_s(n, op=op))

    def coll(self, c: _wl.Collective, pl, comp: str, times: float = 1.0) -> float:
        kw = dict(crosses_nodes=pl.crosses_nodes, num_groups=pl.num_groups,
                  ranks_per_node_in_group=pl.ranks_per_node_in_group)
        return self.ledger.add(comp, self.p.collective_source(c, **kw), times * self.p.collective_time_s(c, **kw))

    def p2p(self, c: _wl.Collective, pl, comp: str, times: float = 1.0) -> float:
        return self.ledger.add(comp, self.p.p2p_source(crosses_nodes=pl.crosses_nodes, coll=c),
                               times * self.p.p2p_time_s(c, crosses_nodes=pl.crosses_nodes))


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


def _layer(w: _wl.Workload, pr: _Pricer, cfg: TrainConfig) -> dict[str, float]:
    """Seconds per layer per micro-batch, by phase and component (one rank)."""
    profile = pr.p
    out = dict.fromkeys(("gemm_fwd", "gemm_bwd", "gemm_re", "attn_fwd", "attn_bwd", "attn_re",
                         "mem_fwd", "mem_bwd", "mem_re", "tp_fwd", "tp_bwd", "tp_re"), 0.0)
    for g in w.gemms:
        key = {"fwd": "gemm_fwd", "dgrad": "gemm_bwd", "wgrad": "gemm_bwd", "recompute": "gemm_re"}[g.phase]
        out[key] += pr.gemm(g, "recompute" if key == "gemm_re" else "gemm", g.count)
    for a in w.attention:
        key = "attn_re" if a.name.endswith("recompute") else f"attn_{a.phase}"
        out[key] += pr.attention(a, "recompute" if key == "attn_re" else "attention")
    fused = profile.attention_fused
    for op in w.memops:
        if op.explicit_attention_only and fused:
            continue
        t = pr.nbytes(op.bytes, op.name, "memops", op.count)
        out[f"mem_{op.phase}"] += t
        if (op.phase == "fwd" and cfg.parallel.recompute == "full") or \
                (op.phase == "fwd" and cfg.parallel.recompute == "selective" and op.explicit_attention_only):
            # full: the whole forward runs again; selective: the attention core (softmax with it)
            out["mem_re"] += pr.nbytes(op.bytes, op.name, "recompute", op.count)
    tp = group_placement(cfg, "tp", ranks_per_node=profile.ranks_per_node)
    for c in w.collectives:
        f = profile.overlap("tp_wgrad" if c.overlappable else "tp")
        comp = "recompute" if c.phase == "recompute" else "tp_comm"
        out[{"fwd": "tp_fwd", "bwd": "tp_bwd", "recompute": "tp_re"}.get(c.phase, "tp_bwd")] += \
            pr.coll(c, tp, comp, c.count * f)
    return out


def _tp_one(w: _wl.Workload, pr: _Pricer, cfg: TrainConfig, comp: str) -> float:
    """One forward TP reduction of [T, d] (the vocab-parallel embedding's, or the LM head
    input's gradient): the first forward collective of the layer, priced once."""
    tp = group_placement(cfg, "tp", ranks_per_node=pr.p.ranks_per_node)
    fwd = [c for c in w.collectives if c.phase == "fwd" and c.kind in ("allreduce", "reduce_scatter")]
    if not fwd:
        return 0.0
    return pr.coll(fwd[0], tp, comp, pr.p.overlap("tp"))


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
    ledger = Ledger()
    pr = _Pricer(profile, ledger)
    lay = _layer(w, pr, cfg)
    m, v = p.num_microbatches, p.interleave

    # Pipeline p2p: one activation forward, one gradient backward per micro-batch per
    # boundary (× v chunks interleaved), blocking in 1F1B, so on the critical path.
    pp_pl = group_placement(cfg, "pp", ranks_per_node=profile.ranks_per_node)
    p2p_f = p2p_b = 0.0
    for c in w.p2p:
        t = pr.p2p(c, pp_pl, "pp_p2p", c.count)
        if c.phase == "fwd":
            p2p_f += t
        else:
            p2p_b += t

    # First stage: embedding lookup (+ its backward scatter, same bytes twice) and its TP
    # reduction. Last stage: LM head GEMMs, final norm (fwd + 2× bwd), cross-entropy.
    # Each stage's extras are booked apart; only the bottleneck stage's enter the step.
    emb = [op for op in w.head_memops if op.name == "embedding"]
    first_f = sum(pr.nbytes(op.bytes, op.name, "extra:first") for op in emb) + _tp_one(w, pr, cfg, "extra:first")
    first_b = sum(pr.nbytes(op.bytes, op.name, "extra:first", 2) for op in emb)
    last_f = sum(pr.gemm(g, "extra:last") for g in w.head_gemms if g.phase == "fwd")
    last_b = sum(pr.gemm(g, "extra:last") for g in w.head_gemms if g.phase != "fwd") + \
        _tp_one(w, pr, cfg, "extra:last")
    for op in w.head_memops:
        if op.name == "final_norm":
            last_f += pr.nbytes(op.bytes, op.name, "extra:last")
            last_b += pr.nbytes(2 * op.bytes, op.name, "extra:last")
        elif op.name == "cross_entropy":
            last_f += pr.nbytes(op.bytes, op.name, "extra:last")

    parts_f = {"gemm": lay["gemm_fwd"], "attention": lay["attn_fwd"], "memops": lay["mem_fwd"],
               "tp_comm": lay["tp_fwd"]}
    parts_b = {"gemm": lay["gemm_bwd"], "attention": lay["attn_bwd"], "memops": lay["mem_bwd"],
               "tp_comm": lay["tp_bwd"],
               "recompute": lay["gemm_re"] + lay["attn_re"] + lay["mem_re"] + lay["tp_re"]}
    layers = {k: Ls * (parts_f.get(k, 0.0) + parts_b.get(k, 0.0)) for k in set(parts_f) | set(parts_b)}
    # The profile's per-layer framework overhead, unless the framework's own cost was measured
    # (FrameworkTerms covers the same time: both would count it).
    layers["overhead"] = 0.0 if framework is not None else \
        Ls * ledger.add("overhead", profile.layer_overhead_source(), profile.layer_overhead_time_s())
    layers_f = Ls * sum(parts_f.values())
    stages = {"first": (first_f, first_b), "last": (last_f, last_b)}
    if p.pp == 1:
        stages = {"only": (first_f + last_f, first_b + last_b)}
    name, (ex_f, ex_b) = max(stages.items(), key=lambda kv: sum(kv[1]))
    for st in ("first", "last") if name == "only" else (name,):
        ledger.merge("embedding_head", f"extra:{st}")
    per_mb = dict(layers, pp_p2p=p2p_f + p2p_b, embedding_head=ex_f + ex_b)
    t_f = layers_f + ex_f + p2p_f
    t_b = sum(per_mb.values()) - t_f
    stage_mb = t_f + t_b
    bubble_frac = formulas.bubble_fraction(pp=p.pp, num_microbatches=m, interleave=v)

    br = dict.fromkeys(COMPONENTS, 0.0)
    for k, t in per_mb.items():
        br[k] += m * t
    if p.pp > 1 and v == 1:
        # 1F1B with unequal end stages: the steady state runs at the bottleneck stage's pace
        # (m × its time); the fill and drain pass once through every other stage, which
        # carries the layers, the p2p and its own extras, not the bottleneck's.
        other = {"first": (last_f, last_b), "last": (first_f, first_b)}[name]
        br["bubble"] = (p.pp - 1) * (stage_mb - ex_f - ex_b) + sum(other)
    else:
        br["bubble"] = bubble_frac * m * stage_mb
    # the bubble idles for the same mix of work as the stage: booked with the stage's sources
    for src, t in ledger.shares({k: br[k] for k in per_mb}).items():
        for s, sec in t.items():
            ledger.add("bubble", s, sec)

    # DP gradient sync: reduce-scatter/allreduce buckets overlap the last micro-batch's
    # backward (exposed = max(t − window, f_exposed·t)); the ZeRO allgather follows the
    # optimizer and is exposed. ZeRO-3 gathers parameters in every forward and backward.
    # Everything that can hide shares the same links and one window: the collectives'
    # times add up before the window is subtracted (two collectives cannot both hide
    # behind the same seconds of compute).
    dp_pl = group_placement(cfg, "dp", ranks_per_node=profile.ranks_per_node)
    hideable, window = 0.0, 0.0
    for c in w.dp:
        if c.kind == "allgather" and p.zero_stage >= 3:
            hideable += pr.coll(c, dp_pl, "dp_sync", 2 * m)
            window = max(window, m * stage_mb)
        elif c.overlappable and p.zero_stage >= 2:
            # ZeRO-2/3 reduce-scatter the gradients in every micro-batch's backward
            # (DeepSpeed's partitioned gradients cannot accumulate unreduced)
            hideable += pr.coll(c, dp_pl, "dp_sync", m)
            window = max(window, m * t_b)
        elif c.overlappable:
            hideable += pr.coll(c, dp_pl, "dp_sync")
            window = max(window, t_b)
        else:
            br["dp_sync"] += pr.coll(c, dp_pl, "dp_sync")
    if dp_overlap and window > 0:
        hideable = max(hideable - window, profile.overlap("dp") * hideable)
    br["dp_sync"] += hideable
    br["optimizer"] = pr.nbytes(w.optimizer_bytes, "adamw", "optimizer")
    if framework is not None:  # --- framework terms (issue 11) ---
        br["framework"] = ledger.add("framework", framework.source, framework.step_s(cfg))
    step = sum(br.values())
    shares = ledger.shares(br)

    # The first stage holds the most micro-batches in flight, the last the LM head: take the
    # stage whose total is largest (memory_bytes prices each stage).
    mem = max((_wl.memory_bytes(cfg, stage=s) for s in {0, p.pp - 1}), key=lambda d: sum(d.values()))
    mem_gib = {k: v / GIB for k, v in mem.items()}
    mem_gib["total"] = sum(mem.values()) / GIB
    mem_gib["capacity"] = profile.device_memory_gib
    tflops = formulas.megatron_tflops(cfg, step)
    prof_src = profile.sources()
    sources = {k: summarise(list(v)) for k, v in shares.items()}
    if p.tp > 1:
        sources["overlap.tp"] = profile.overlap_source("tp")
    if p.dp > 1:
        sources["overlap.dp"] = profile.overlap_source("dp")
    sources["peak"] = prof_src["peak"]
    sources["memory"] = prof_src["memory"]
    return Prediction(
        config=cfg, system=profile.name, step_time_s=step, breakdown_s=br,
        stage_fwd_s=t_f, stage_bwd_s=t_b, num_microbatches=m,
        bubble_fraction=br["bubble"] / (m * stage_mb) if stage_mb > 0 else 0.0,
        tokens_per_s=p.global_batch * cfg.model.seq_len / step,
        model_tflops_per_device=tflops, mfu=tflops / profile.peak_tflops,
        fom=formulas.fom(cfg, step), memory_gib_per_device=mem_gib,
        fits_in_memory=mem_gib["total"] <= profile.device_memory_gib,
        seed_model=seed_model(cfg, profile, w=w), sources=sources,
        provenance_s=shares, seconds_by_provenance=seconds_by_word(shares),
        profile_sources=prof_src, notes=list(getattr(profile, "notes", [])),
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
    s.add_argument("--profile", nargs="+", metavar="RUN_DIR",
                   help="measured probe results, priced over --system for what they do not measure")
    s.add_argument("--include-failed", action="store_true",
                   help="leave failed rows (or rows with num_wrong > 0) out of --profile instead of refusing")


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
             "", f"{'component':<16}{'seconds':>12}{'share':>9}  provenance (share of the component)"]
    for k, v in pr.breakdown_s.items():
        lines.append(f"{k:<16}{v:>12.4f}{v / pr.step_time_s:>8.1%}  {word_shares(pr.provenance_s.get(k, {}))}")
    lines.append(f"{'step':<16}{pr.step_time_s:>12.4f}{1:>8.0%}  {word_shares({w: t for w, t in pr.seconds_by_provenance.items()})}")
    lines.append("by provenance                    " + ", ".join(
        f"{w} {t:.4g} s ({t / pr.step_time_s:.1%})" for w, t in pr.seconds_by_provenance.items()))
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
              "", "sources (measured: at the priced shape and group; extrapolated: from what; "
              "specified: file and key)"]
    lines += [f"  {k:<15}{v}" for k, v in pr.sources.items()]
    lines += [f"note: {n}" for n in pr.notes]
    return "\n".join(lines)


def word_shares(per_source: dict[str, float]) -> str:
    """'measured 62% · extrapolated 38%' from {source or word: seconds}."""
    tot: dict[str, float] = {}
    for src, t in per_source.items():
        tot[word_of(src)] = tot.get(word_of(src), 0.0) + t
    all_t = sum(tot.values())
    if all_t <= 0:
        return "-"
    return " · ".join(f"{w} {tot[w] / all_t:.0%}" for w in WORDS if tot.get(w, 0) > 0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.predict", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--no-dp-overlap", action="store_true", help="expose the whole DP gradient sync")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
        profile = load_profile(system=a.system, profile_dirs=a.profile, include_failed=a.include_failed)
        pr = predict(cfg, profile, dp_overlap=not a.no_dp_overlap)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(pr.to_dict()) if a.json else format_table(pr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
