"""Step-time prediction: compose the workload's operations, priced by a system profile.

The workload (``microbench.model.workload``) lists every operation of a step with its phase
(``fwd | recompute | bwd | step``) and multiplicity; the profile prices one operation at a
time (seconds and their source); this module only composes, from the declarative table
:data:`ROUTES` — (operation kind, phase) → step component — in the manner of torchtitan's
``parallelize`` plans. Nothing here derives a shape or a count.

Per pipeline stage and micro-batch, each phase costs its device time (GEMMs, attention core,
memory-bound ops, TP collectives exposed as the profile says, the stage's extras) and the
host's own time (:class:`~microbench.model.workload.HostPath`): the larger of the two on a
device that queues kernels asynchronously (GPU, XPU), their sum on a synchronous one (a
CPU); the host time the device does not hide is the ``framework`` component. Pipeline p2p
blocks, so it is on the critical path outside that comparison. The step is the 1F1B (or
interleaved) schedule: m micro-batches at the slowest stage's pace plus the fill and drain,
(p−1)/v·(t_f + t_b) for equal stages (Narayanan et al. 2021, §2.2); in 1F1B the fill passes
through the other stages, so it is priced with their time, not the bottleneck's. Then the
exposed DP gradient sync and the optimizer step.

CLI: ``python -m analysis.predict --model alcf-1t --system aurora [--json]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from microbench.harness import modelargs
from microbench.harness.cli import ArgumentParser
from microbench.model import workload as _wl
from microbench.model import memory as _mem
from microbench.model.metrics import megatron_tflops
from microbench.model.config import TrainConfig
from microbench.model.vocabulary import STEP_COMPONENTS, word_mix

from analysis import formulas
from analysis.errors import require_finite
from analysis.measured import load_profile
from analysis.placement import group_placement
from analysis.provenance import Ledger, seconds_by_word, summarise
from analysis.system import SystemProfile

GIB = 2 ** 30
COMPONENTS = STEP_COMPONENTS
LAYER_PHASES = ("fwd", "recompute", "bwd")

ROUTES: dict[tuple[str, str], str] = {
    ("gemm", "fwd"): "gemm", ("gemm", "bwd"): "gemm", ("gemm", "recompute"): "recompute",
    ("attention", "fwd"): "attention", ("attention", "bwd"): "attention", ("attention", "recompute"): "recompute",
    ("memop", "fwd"): "memops", ("memop", "bwd"): "memops", ("memop", "recompute"): "recompute",
    ("collective", "fwd"): "tp_comm", ("collective", "bwd"): "tp_comm", ("collective", "recompute"): "recompute",
    ("host", "fwd"): "framework", ("host", "recompute"): "framework", ("host", "bwd"): "framework",
    ("p2p", "fwd"): "pp_p2p", ("p2p", "bwd"): "pp_p2p",
    ("collective", "step"): "dp_sync", ("memop", "step"): "optimizer",
    ("tp_sync", "fwd"): "tp_comm", ("tp_sync", "bwd"): "tp_comm", ("tp_sync", "recompute"): "recompute",
}
"""Where a layer's (or a step's) operation is booked; a stage's extras (embedding, LM head,
loss) all go to ``embedding_head``. ``framework`` books only the host time the device does not
hide (:func:`_exposed`)."""


def kind_of(op) -> str:
    if isinstance(op, _wl.Collective):
        return "p2p" if op.kind == "sendrecv" else "collective"
    return {_wl.Gemm: "gemm", _wl.Attention: "attention", _wl.MemOp: "memop", _wl.HostPath: "host",
            _wl.TpSync: "tp_sync"}[type(op)]


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
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per phase (fwd, recompute, bwd) of one micro-batch on the bottleneck stage: ``host_s``,
    ``device_s`` and which one bound it (``bound``: ``host`` or ``device``)."""
    asynchronous: bool = True
    """How host and device composed: the larger (an asynchronous device) or the sum."""
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
    (analysis.provenance) under the component it belongs to; collectives on the placement of
    their axis, TP collectives times their exposed fraction."""

    def __init__(self, cfg: TrainConfig, profile: SystemProfile, ledger: Ledger):
        self.cfg, self.p, self.ledger = cfg, profile, ledger
        self.placements = {ax: group_placement(cfg, ax, ranks_per_node=profile.ranks_per_node)
                           for ax in ("tp", "dp", "pp")}

    def seconds(self, op, comp: str, times: float = 1.0) -> float:
        """``op`` priced × its count × ``times`` (and × its exposed fraction: a TP
        collective's), booked under ``comp``."""
        placement = self.placements.get(getattr(op, "axis", None))
        t, src = self.p.price(op, placement)
        if kind_of(op) == "collective" and op.axis == "tp":
            times *= self.p.overlap("tp_wgrad" if op.overlappable else "tp").seconds
        return self.ledger.add(comp, src, getattr(op, "count", 1) * times * t)

    def layer(self, w: _wl.Workload) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """One layer, one micro-batch: device seconds by component and by phase, host seconds
        by phase (each booked; the host under ``host:<phase>`` until its exposure is known)."""
        by_comp = dict.fromkeys(COMPONENTS, 0.0)
        device, host = dict.fromkeys(LAYER_PHASES, 0.0), dict.fromkeys(LAYER_PHASES, 0.0)
        fused = self.p.attention_fused
        for op in w.layer:
            if getattr(op, "explicit_attention_only", False) and fused:
                continue
            kind, phase = kind_of(op), _wl.step_phase(op)
            if kind == "host":
                host[phase] += self.seconds(op, f"host:{phase}")
                continue
            t = self.seconds(op, ROUTES[(kind, phase)])
            by_comp[ROUTES[(kind, phase)]] += t
            device[phase] += t
        return by_comp, device, host

    def extras(self, ops: tuple, stage: str) -> dict[str, float]:
        """A stage's extras per micro-batch, device seconds by phase (booked ``extra:<stage>``)."""
        out = dict.fromkeys(LAYER_PHASES, 0.0)
        for op in ops:
            out[_wl.step_phase(op)] += self.seconds(op, f"extra:{stage}")
        return out


@dataclass
class _Stage:
    """One micro-batch on one stage: device and host seconds by phase, and what was exposed."""

    device: dict[str, float]
    host: dict[str, float]
    asynchronous: bool

    def exposed(self, phase: str) -> float:
        """The host's seconds the device does not hide: all of them on a synchronous device,
        the excess over the device's on an asynchronous one."""
        h, d = self.host[phase], self.device[phase]
        return max(0.0, h - d) if self.asynchronous else h

    @property
    def fwd_s(self) -> float:
        return self.device["fwd"] + self.exposed("fwd")

    @property
    def bwd_s(self) -> float:
        return sum(self.device[ph] + self.exposed(ph) for ph in ("recompute", "bwd"))

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    def phases(self) -> dict[str, dict[str, Any]]:
        return {ph: {"host_s": self.host[ph], "device_s": self.device[ph],
                     "bound": "host" if self.host[ph] > self.device[ph] else "device"}
                for ph in LAYER_PHASES if self.host[ph] or self.device[ph]}


def _stage(Ls: int, device: dict[str, float], host: dict[str, float], extra: dict[str, float],
           asynchronous: bool) -> _Stage:
    return _Stage({ph: Ls * device[ph] + extra[ph] for ph in LAYER_PHASES},
                  {ph: Ls * host[ph] for ph in LAYER_PHASES}, asynchronous)


def seed_model(cfg: TrainConfig, profile: SystemProfile, *, w: _wl.Workload | None = None) -> dict[str, float]:
    """The benchmark's two-term formula with α and β from this profile.

    α (s per multiply-add per device): the profile's achieved rate on the layer's GEMMs
    (fwd, dgrad, wgrad), α = 2·Σt/ΣFLOP. β (s per element): the TP allreduce of [mbs·s, d]
    from the workload, time/elements (with SP: its allgather + reduce-scatter pair); 0 with TP 1.
    """
    w = w or _wl.workload(cfg)
    big = [g for g in w.gemms if g.phase in ("fwd", "dgrad", "wgrad")]
    t = sum(g.count * profile.gemm(g).seconds for g in big)
    flop = sum(g.count * g.flop for g in big)
    alpha = 2 * t / flop
    beta = 0.0
    if cfg.parallel.tp > 1:
        tp = group_placement(cfg, "tp", ranks_per_node=profile.ranks_per_node)
        fwd = [c for c in w.collectives if c.phase == "fwd"]
        beta = sum(profile.collective(c, tp).seconds for c in fwd) / fwd[0].elements
    return {"alpha": alpha, "beta": beta, "step_time_s": formulas.seed_step_time(cfg, alpha=alpha, beta=beta)}


def predict(cfg: TrainConfig, profile: SystemProfile, *, dp_overlap: bool = True,
            p2p_scatter_gather: bool = False) -> Prediction:
    """Predicted step time of ``cfg`` on ``profile`` (see the module docstring for the model)."""
    w = _wl.workload(cfg, p2p_scatter_gather=p2p_scatter_gather)
    ledger = Ledger()
    pr = _Pricer(cfg, profile, ledger)
    layer_comp, layer_dev, layer_host = pr.layer(w)
    p2p = {ph: sum(pr.seconds(c, "pp_p2p") for c in w.p2p if c.phase == ph) for ph in ("fwd", "bwd")}
    stages = _stages(cfg, pr, w, layer_dev, layer_host)
    name = max(("first", "last"), key=lambda k: stages[k].total_s) if len(stages) > 1 else "only"
    per_mb = _per_microbatch(cfg, layer_comp, stages[name], p2p, ledger, name)
    notes = list(getattr(profile, "notes", []))
    br = _schedule(cfg, per_mb, stages, name, p2p, ledger, sharing=profile.host_sharing, notes=notes)
    _step_ops(cfg, w, pr, br, t_b=stages[name].bwd_s + p2p["bwd"], stage_mb=sum(per_mb.values()),
              dp_overlap=dp_overlap)
    pred = _prediction(cfg, profile, w, ledger, br, stages[name], p2p, name, notes)
    require_finite({**pred.breakdown_s, "step": pred.step_time_s, **{f"{k} share ({w})": v for k, by in
                    pred.provenance_s.items() for w, v in by.items()}}, pred.sources, where=profile.name)
    return pred


def _stages(cfg: TrainConfig, pr: _Pricer, w: _wl.Workload, device: dict[str, float],
            host: dict[str, float]) -> dict[str, _Stage]:
    """The stages that differ: the first (embedding), the last (LM head, loss) and the middle
    ones (layers only); one stage holds both ends when pp = 1."""
    Ls, asyn = cfg.layers_per_stage, pr.p.asynchronous
    first, last = pr.extras(w.first, "first"), pr.extras(w.last, "last")
    none = dict.fromkeys(LAYER_PHASES, 0.0)
    if cfg.parallel.pp == 1:
        both = {ph: first[ph] + last[ph] for ph in LAYER_PHASES}
        return {"only": _stage(Ls, device, host, both, asyn)}
    return {"first": _stage(Ls, device, host, first, asyn), "last": _stage(Ls, device, host, last, asyn),
            "middle": _stage(Ls, device, host, none, asyn)}


def _per_microbatch(cfg: TrainConfig, layer_comp: dict[str, float], stage: _Stage, p2p: dict[str, float],
                    ledger: Ledger, name: str) -> dict[str, float]:
    """The bottleneck stage's seconds per micro-batch by component: its layers' device
    components, the host time they do not hide, p2p and its extras."""
    Ls = cfg.layers_per_stage
    per_mb = {k: Ls * v for k, v in layer_comp.items() if v}
    per_mb["framework"] = sum(stage.exposed(ph) for ph in LAYER_PHASES)
    for ph in LAYER_PHASES:
        ledger.merge("framework", f"host:{ph}")
    per_mb["pp_p2p"] = p2p["fwd"] + p2p["bwd"]
    per_mb["embedding_head"] = stage.total_s - per_mb["framework"] - Ls * sum(layer_comp.values())
    for st in ("first", "last") if name == "only" else (name,):
        ledger.merge("embedding_head", f"extra:{st}")
    return per_mb


def _schedule(cfg: TrainConfig, per_mb: dict[str, float], stages: dict[str, _Stage], name: str,
              p2p: dict[str, float], ledger: Ledger, *, sharing: tuple[float, str] | None,
              notes: list[str]) -> dict[str, float]:
    """m micro-batches at the bottleneck's pace, and the fill and drain (the bubble).

    ``sharing`` (σ > 1: a host's ranks oversubscribe its cores, each op priced with all of them
    busy): in the fill and drain the idle stages' cores run the busy ones', so the step is the
    larger of two bounds, the work over the cores (m × the stage, as priced) and the critical
    path at a core's own pace ((m × the stage + the bubble) / σ); the bubble is what the
    second leaves beyond the first."""
    p, m, v = cfg.parallel, cfg.parallel.num_microbatches, cfg.parallel.interleave
    stage_mb = sum(per_mb.values())
    br = dict.fromkeys(COMPONENTS, 0.0)
    for k, t in per_mb.items():
        br[k] += m * t
    if p.pp > 1 and v == 1:
        # 1F1B with unequal end stages: the steady state runs at the bottleneck stage's pace
        # (m × its time); the fill and drain pass once through every other stage, which
        # carries the layers, the p2p and its own extras, not the bottleneck's.
        pp_s = p2p["fwd"] + p2p["bwd"]
        others = [k for k in ("first", "last", "middle") if k != name]
        ends = [k for k in others if k != "middle"]
        br["bubble"] = sum(stages[k].total_s + pp_s for k in ends) + \
            (p.pp - 1 - len(ends)) * (stages["middle"].total_s + pp_s)
    else:
        br["bubble"] = formulas.bubble_fraction(pp=p.pp, num_microbatches=m, interleave=v) * m * stage_mb
    if sharing is not None and br["bubble"] > 0:
        was, busy = br["bubble"], m * stage_mb
        br["bubble"] = max(0.0, (busy + was) / sharing[0] - busy)
        notes.append(f"host sharing σ = {sharing[0]:g}, {sharing[1]}: the bubble {was:.4g} s → "
                     f"{br['bubble']:.4g} s (the fill and drain run on the idle stages' cores)")
    # the bubble idles for the same mix of work as the stage: booked with the stage's sources
    for src, t in ledger.shares({k: br[k] for k in per_mb}).items():
        for s, sec in t.items():
            ledger.add("bubble", s, sec)
    return br


def _step_ops(cfg: TrainConfig, w: _wl.Workload, pr: _Pricer, br: dict[str, float], *, t_b: float,
              stage_mb: float, dp_overlap: bool) -> None:
    """The DP gradient sync and the optimizer, once per step. Reduce-scatter/allreduce buckets
    overlap the backward (exposed = max(t − window, f_exposed·t)); the ZeRO allgather follows
    the optimizer and is exposed; ZeRO-3 gathers in every forward and backward. Everything
    that can hide shares the same links and one window: the collectives' times add up before
    the window is subtracted (two collectives cannot both hide behind the same seconds)."""
    p, m = cfg.parallel, cfg.parallel.num_microbatches
    hideable, window = 0.0, 0.0
    for op in w.step:
        t = pr.seconds(op, ROUTES[(kind_of(op), "step")])
        if kind_of(op) != "collective":
            br[ROUTES[(kind_of(op), "step")]] += t
        elif op.kind == "allgather" and p.zero_stage >= 3:
            hideable, window = hideable + t, max(window, m * stage_mb)
        elif op.overlappable:
            hideable, window = hideable + t, max(window, (m if p.zero_stage >= 2 else 1) * t_b)
        else:
            br["dp_sync"] += t
    if dp_overlap and window > 0:
        hideable = max(hideable - window, pr.p.overlap("dp").seconds * hideable)
    br["dp_sync"] += hideable


def _prediction(cfg: TrainConfig, profile: SystemProfile, w: _wl.Workload, ledger: Ledger, br: dict[str, float],
                stage: _Stage, p2p: dict[str, float], name: str, notes: list[str]) -> Prediction:
    p, m = cfg.parallel, cfg.parallel.num_microbatches
    step = sum(br.values())
    shares = ledger.shares(br)
    # The first stage holds the most micro-batches in flight, the last the LM head: take the
    # stage whose total is largest (memory_bytes prices each stage).
    mem = max((_mem.memory_bytes(cfg, stage=s) for s in {0, p.pp - 1}), key=lambda d: sum(d.values()))
    mem_gib = {k: v / GIB for k, v in mem.items()}
    mem_gib["total"] = sum(mem.values()) / GIB
    mem_gib["capacity"] = profile.device_memory_gib
    tflops = megatron_tflops(cfg, step)
    prof_src = profile.sources()
    sources = {k: summarise(list(v)) for k, v in shares.items()}
    if p.tp > 1:
        sources["overlap.tp"] = profile.overlap("tp").source
    if p.dp > 1:
        sources["overlap.dp"] = profile.overlap("dp").source
    sources["peak"], sources["memory"] = prof_src["peak"], prof_src["memory"]
    t_f, t_b = stage.fwd_s + p2p["fwd"], stage.bwd_s + p2p["bwd"]
    stage_mb = t_f + t_b
    return Prediction(
        config=cfg, system=profile.name, step_time_s=step, breakdown_s=br,
        stage_fwd_s=t_f, stage_bwd_s=t_b, num_microbatches=m,
        bubble_fraction=br["bubble"] / (m * stage_mb) if stage_mb > 0 else 0.0,
        tokens_per_s=p.global_batch * cfg.model.seq_len / step,
        model_tflops_per_device=tflops, mfu=tflops / profile.peak_tflops,
        fom=formulas.fom(cfg, step), memory_gib_per_device=mem_gib,
        fits_in_memory=mem_gib["total"] <= profile.device_memory_gib,
        seed_model=seed_model(cfg, profile, w=w), sources=sources,
        phases=stage.phases(), asynchronous=profile.asynchronous,
        provenance_s=shares, seconds_by_provenance=seconds_by_word(shares),
        profile_sources=prof_src, notes=notes,
        placement={ax: dataclasses.asdict(group_placement(cfg, ax, ranks_per_node=profile.ranks_per_node))
                   for ax in ("tp", "dp", "pp")} | {"bottleneck_stage": {"name": name}})


# ---------------------------------------------------------------------------------------------
# CLI

def add_config_args(ap: argparse.ArgumentParser) -> None:
    """The shared model and layout flags (``microbench.harness.modelargs``), then the system."""
    modelargs.add_model_args(ap, layout="preset")
    s = ap.add_argument_group("system")
    s.add_argument("--system", help="shipped spec (analysis/systems/NAME.yaml) or a YAML path")
    s.add_argument("--profile", nargs="+", metavar="RUN_DIR",
                   help="measured probe results, priced over --system for what they do not measure")
    s.add_argument("--include-failed", action="store_true",
                   help="leave failed rows (or rows with num_wrong > 0) out of --profile instead of refusing")
    s.add_argument("--allow-incomplete", action="store_true", default=None,
                   help="use the rows of --profile runs whose manifest was never closed (every rank died); "
                        "same as MICROBENCH_ALLOW_INCOMPLETE=1")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The flags' configuration: a preset changed where a flag is stated, or a custom model."""
    return modelargs.config_from_args(a, layout="preset")


def format_table(pr: Prediction) -> str:
    cfg = pr.config
    p = cfg.parallel
    lines = [f"{cfg.model.name} on {pr.system}: tp {p.tp} × pp {p.pp} × dp {p.dp} = {p.world_size} ranks, "
             f"mbs {p.micro_batch}, gbs {p.global_batch} ({pr.num_microbatches} micro-batches), "
             f"interleave {p.interleave}, recompute {p.recompute}, sp {p.sequence_parallel}, zero {p.zero_stage}",
             "", f"{'component':<16}{'seconds':>12}{'share':>9}  provenance (share of the component)"]
    for k, v in pr.breakdown_s.items():
        lines.append(f"{k:<16}{v:>12.4f}{v / pr.step_time_s:>8.1%}  {word_mix(pr.provenance_s.get(k, {}))}")
    lines.append(f"{'step':<16}{pr.step_time_s:>12.4f}{1:>8.0%}  {word_mix({w: t for w, t in pr.seconds_by_provenance.items()})}")
    lines.append("by provenance                    " + ", ".join(
        f"{w} {t:.4g} s ({t / pr.step_time_s:.1%})" for w, t in pr.seconds_by_provenance.items()))
    mem = pr.memory_gib_per_device
    how = "the larger bounds each phase (asynchronous device)" if pr.asynchronous else \
        "they add (synchronous device)"
    lines += ["", f"per micro-batch, bottleneck stage: host and device by phase ({how})"]
    lines += [f"  {ph:<10} host {v['host_s'] * 1e3:>9.3f} ms  device {v['device_s'] * 1e3:>9.3f} ms  "
              f"bound by {v['bound']}" for ph, v in pr.phases.items()]
    lines += [f"stage fwd / bwd per micro-batch  {pr.stage_fwd_s * 1e3:.2f} / {pr.stage_bwd_s * 1e3:.2f} ms; "
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m analysis.predict", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--no-dp-overlap", action="store_true", help="expose the whole DP gradient sync")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
        profile = load_profile(system=a.system, profile_dirs=a.profile, include_failed=a.include_failed,
                               allow_incomplete=a.allow_incomplete)
        pr = predict(cfg, profile, dp_overlap=not a.no_dp_overlap)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(pr.to_dict()) if a.json else format_table(pr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
