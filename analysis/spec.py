"""A system from its specification: the spec profile that prices from the YAML
(:mod:`analysis.spec_schema` holds the schema that validates it).

Pricing (:class:`SpecProfile`): peak rates with a GEMM efficiency model (tile and wave
quantization, small-k ramp, memory roofline), memory bandwidth, link bandwidth and latency
per tier (inside a node, between nodes with NICs per node) and hierarchical collectives.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping

from microbench.model.metrics import bus_factor, latency_steps
from microbench.model.devices import DEVICES_FILE, device
from microbench.model.workload import Attention, Collective, Gemm, HostPath, MemOp

from analysis.errors import AnalysisError
from analysis.provenance import display_path
from analysis.placement import Placement
from analysis.spec_schema import read_spec, set_dotted, validate_spec
from analysis.system import Priced, SystemProfile


# ---------------------------------------------------------------------------------------------
# Pricing

class SpecProfile(SystemProfile):
    """A system from its specification; every number lives in a YAML file, none in the code."""

    def __init__(self, spec: Mapping[str, Any], *, source: str = "<dict>", text: str | None = None):
        where = display_path(source) if source != "<dict>" else source
        s = validate_spec(spec, where=where, text=text)
        self.spec = copy.deepcopy(dict(spec))
        self.source = source
        self.where = where
        self.schema = s
        self.name = s.name
        self.nodes = s.nodes
        self.device_key = s.device.model
        dev = device(s.device.model)
        self._peaks = {str(k): float(v) for k, v in dev["peak_tflops"].items()}
        self.mem_bw_gbps = float(dev["mem_bw_gbps"])
        self.device_memory_gib = float(dev["memory_gib"])
        self.num_units = int(dev["compute_units"])
        self.asynchronous = bool(dev["asynchronous"])
        self.ranks_per_node = s.node.ranks_per_node
        e = s.efficiency
        self.gemm_max = e.gemm_max
        self.gemm_tile = (e.gemm_tile[0], e.gemm_tile[1])
        self.gemm_k_half = e.gemm_k_half
        self.gemm_latency_s = e.gemm_latency_us * 1e-6
        self.attention_eff = e.attention
        self._attention_fused = e.attention_fused
        self.memop_eff = e.memop
        self.memop_latency_s = e.memop_latency_us * 1e-6
        n = s.network
        self.intra_busbw = n.intra.busbw_gbps * n.intra.efficiency
        self.intra_p2p = n.intra.p2p_gbps * n.intra.efficiency
        self.node_inter_gbps = n.inter.nic_gbps * n.inter.nics_per_node * n.inter.efficiency
        self.latency = {"intra": n.intra.latency, "inter": n.inter.latency}
        self.host_s = {"fwd": s.host.fwd_us * 1e-6, "recompute": s.host.recompute_us * 1e-6,
                       "bwd": s.host.bwd_us * 1e-6}
        self.tp_call_s = s.host.tp_call_us * 1e-6
        self._overlap = {"dp": s.overlap.dp, "tp": s.overlap.tp, "tp_wgrad": s.overlap.tp_wgrad}
        self.dtype = s.device.dtype
        self.peak_tflops = self.peak_for(self.dtype)
        self.provenance_notes = dict(s.provenance or {})

    # construction ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> "SpecProfile":
        data, text, p = read_spec(name_or_path)
        return cls(data, source=str(p), text=text)

    def with_knobs(self, knobs: Mapping[str, Any], *, because: str | None = None) -> "SpecProfile":
        """A copy with dotted keys replaced, e.g. ``{"efficiency.gemm_max": 0.7}``; the copy
        is validated like a file (an unknown knob is refused). ``because``, when given,
        becomes each replaced key's provenance, so every source that cites it says so."""
        spec = copy.deepcopy(self.spec)
        for k, v in knobs.items():
            set_dotted(spec, k, v)
        if because:
            spec["provenance"] = {**(spec.get("provenance") or {}), **dict.fromkeys(knobs, because)}
        return SpecProfile(spec, source=self.source)

    def peak_for(self, dtype: str) -> float:
        if dtype in self._peaks:
            return self._peaks[dtype]
        raise AnalysisError(f"system {self.name}: device {self.device_key} has no peak_tflops for dtype "
                            f"{dtype!r} in {display_path(DEVICES_FILE)}; has {', '.join(self._peaks)}")

    # provenance ------------------------------------------------------------------------
    def spec_source(self, *keys: str) -> str:
        """``specified (file: keys)``; device keys (``device:FIELD``) name devices.yaml."""
        cache = self.__dict__.setdefault("_source_cache", {})  # a prediction asks ~70×, calibration 10⁵×
        if keys not in cache:
            cache[keys] = self._spec_source(*keys)
        return cache[keys]

    def _spec_source(self, *keys: str) -> str:
        own = [k for k in keys if not k.startswith("device:")]
        dev = [f"{self.device_key}.{k.split(':', 1)[1]}" for k in keys if k.startswith("device:")]
        parts = []
        if own:
            notes = [self.provenance_notes[k] for k in own if k in self.provenance_notes]
            parts.append(f"{self.where}: {', '.join(own)}" + (f" — {'; '.join(notes)}" if notes else ""))
        if dev:
            parts.append(f"{display_path(DEVICES_FILE)}: {', '.join(dev)}")
        return f"specified ({'; '.join(parts)})"

    def _link_source(self, tier: str, *extra: str) -> str:
        if tier == "intra":
            keys = ("network.intra.busbw_gbps", "network.intra.efficiency", "network.intra.latency")
        else:
            keys = ("network.inter.nic_gbps", "network.inter.nics_per_node", "network.inter.efficiency",
                    "network.inter.latency")
        return self.spec_source(*keys, *extra)

    def sources(self) -> dict[str, str]:
        g = Gemm("g", "fwd", 1, 1, 1, 1, self.dtype)
        c = Collective("c", "allreduce", "tp", 1, self.dtype, 1, "fwd", 2)
        one, many = Placement(False, 2, 1, 1), Placement(True, 1, 2, 1)
        return {"peak": self.spec_source(f"device:peak_tflops.{self.dtype}"),
                "memory": self.spec_source("device:memory_gib"),
                "gemm": self.gemm(g).source,
                "attention": self.attention(Attention("fwd", 1, 1, 1, 1, 1, self.dtype)).source,
                "memop": self.memop(MemOp("copy", "fwd", 1, 1)).source,
                "collective.intra": self.collective(c, one).source,
                "collective.inter": self.collective(c, many).source,
                "p2p.intra": self.p2p(c, one).source,
                "p2p.inter": self.p2p(c, many).source,
                **{f"overlap.{k}": self.overlap(k).source for k in ("dp", "tp", "tp_wgrad")},
                "host": self.host(HostPath("fwd")).source,
                "tp_sync": self.tp_sync(None).source}

    # compute --------------------------------------------------------------------------
    def gemm_efficiency(self, gemm: Gemm) -> float:
        """Fraction of peak: gemm_max × tile quantization × wave quantization × k ramp.
        Tiles: the output is cut in tm×tn tiles, partial tiles cost full ones; waves: tiles run
        in waves of ``compute_units`` (NVIDIA's "wave quantization", GEMM performance guide),
        so a GEMM whose tiles fill a fraction of one wave runs at that fraction of the
        device; small k amortizes the epilogue badly: k/(k + k_half)."""
        tm, tn = self.gemm_tile
        mt, nt = math.ceil(gemm.m / tm), math.ceil(gemm.n / tn)
        q_tile = gemm.m * gemm.n / (mt * tm * nt * tn)
        tiles = mt * nt * gemm.batch
        waves = math.ceil(tiles / self.num_units)
        q_wave = tiles / (waves * self.num_units)
        k_ramp = gemm.k / (gemm.k + self.gemm_k_half)
        return self.gemm_max * q_tile * q_wave * k_ramp

    def gemm_seconds(self, gemm: Gemm, *, efficiency: float | None = None) -> float:
        """Roofline: the slower of the tensor-core time at the shape's efficiency and the
        minimum traffic at the memory-bound ops' achieved bandwidth; plus a fixed latency.
        ``efficiency`` replaces ``gemm_max`` (the attention's batched GEMMs use their own)."""
        eff = self.gemm_efficiency(gemm)
        if efficiency is not None:
            eff *= efficiency / self.gemm_max
        compute = gemm.flop / (self.peak_for(gemm.dtype) * 1e12 * eff)
        memory = gemm.bytes / (self.mem_bw_gbps * 1e9 * self.memop_eff)
        return max(compute, memory) + self.gemm_latency_s

    def gemm(self, gemm: Gemm) -> Priced:
        return Priced(self.gemm_seconds(gemm), self.spec_source(
            f"device:peak_tflops.{gemm.dtype}", "device:compute_units", "device:mem_bw_gbps",
            "efficiency.gemm_max", "efficiency.gemm_tile", "efficiency.gemm_k_half",
            "efficiency.gemm_latency_us", "efficiency.memop"))

    def attention(self, att: Attention) -> Priced:
        """Fused (flash) attention: causal FLOPs at a fixed fraction of peak. Explicit
        (unfused) attention, as Megatron's CoreAttention runs it: its batched GEMMs
        (``Attention.gemms``) one by one, each on the GEMM roofline at the attention
        efficiency. With k = head_dim the s×s score write costs about as much as the
        arithmetic (2·head_dim FLOP per 2 bytes), so it is priced, not assumed compute-bound
        (the softmax and dropout on the scores are separate memops)."""
        if self._attention_fused:
            flop = att.flop_causal if att.causal else att.flop
            t = flop / (self.peak_for(att.dtype) * 1e12 * self.attention_eff) + self.gemm_latency_s
            return Priced(t, self.spec_source(f"device:peak_tflops.{att.dtype}", "efficiency.attention",
                                              "efficiency.attention_fused", "efficiency.gemm_latency_us"))
        t = sum(self.gemm_seconds(g, efficiency=self.attention_eff) for g in att.gemms)
        return Priced(t, self.spec_source(
            f"device:peak_tflops.{att.dtype}", "device:compute_units", "device:mem_bw_gbps",
            "efficiency.attention", "efficiency.attention_fused", "efficiency.gemm_tile",
            "efficiency.gemm_k_half", "efficiency.gemm_latency_us", "efficiency.memop"))

    @property
    def attention_fused(self) -> bool:
        return self._attention_fused

    def memop(self, op: MemOp) -> Priced:
        t = op.bytes / (self.mem_bw_gbps * 1e9 * self.memop_eff) + self.memop_latency_s
        return Priced(t, self.spec_source("device:mem_bw_gbps", "efficiency.memop", "efficiency.memop_latency_us"))

    def host(self, h: HostPath) -> Priced:
        if h.name == "tp_call":
            return Priced(self.tp_call_s, self.spec_source("host.tp_call_us", "device:asynchronous"))
        return Priced(self.host_s[h.phase], self.spec_source(f"host.{h.phase}_us", "device:asynchronous"))

    def tp_sync(self, op) -> Priced:
        """A spec prices a TP reduction as a whole (its link, efficiency and latency stand for
        the reduction as it runs in a step): no separate in-step term, and the source says so."""
        return Priced(0.0, self.spec_source("network.intra.busbw_gbps", "network.intra.efficiency",
                                            "network.intra.latency")
                      .replace("specified (", "specified (no in-step term apart from the reduction's own price: ", 1))

    # communication --------------------------------------------------------------------
    def alpha_s(self, tier: str, kind: str, n: int) -> float:
        """One call's latency on ``tier`` (intra|inter) for a group of ``n``: base + per step ×
        the algorithm's steps (:class:`Latency`)."""
        lat = self.latency[tier]
        return (lat.base_us + lat.per_step_us * latency_steps(kind, n, lat.law)) * 1e-6

    def _intra_s(self, kind: str, size: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return self.alpha_s("intra", kind, n) + bus_factor(kind, n) * size / (self.intra_busbw * 1e9)

    def _inter_rank_gbps(self, active_ranks: int) -> float:
        return self.node_inter_gbps / max(1, min(active_ranks, self.ranks_per_node))

    def collective(self, coll: Collective, placement: Placement) -> Priced:
        n, size, kind = coll.group_size, float(coll.bytes), coll.kind
        if kind == "sendrecv":
            return self.p2p(coll, placement)
        tier = "inter" if placement.crosses_nodes else "intra"
        source = self._link_source(tier) if tier == "intra" else \
            self.spec_source("network.intra.busbw_gbps", "network.intra.efficiency", "network.intra.latency",
                             "network.inter.nic_gbps", "network.inter.nics_per_node", "network.inter.efficiency",
                             "network.inter.latency")
        if n <= 1:
            return Priced(0.0, source)
        if not placement.crosses_nodes:
            return Priced(self._intra_s(kind, size, n), source)
        # Hierarchical (NCCL/oneCCL two-level): intra-node reduce-scatter, inter-node
        # collective of S/r over the nodes with each rank on its own NIC share, intra allgather.
        r = max(1, min(placement.ranks_per_node_in_group or 1, n))
        nodes = max(2, math.ceil(n / r))
        bw = self._inter_rank_gbps(r * max(1, placement.num_groups)) * 1e9
        inter = bus_factor(kind, nodes) * (size / r) / bw + self.alpha_s("inter", kind, nodes)
        intra = 0.0
        if r > 1:
            if kind == "allreduce":
                intra = self._intra_s("reduce_scatter", size, r) + self._intra_s("allgather", size, r)
            else:
                intra = self._intra_s(kind, size, r)
        return Priced(intra + inter, source)

    def p2p(self, coll: Collective, placement: Placement) -> Priced:
        if placement.crosses_nodes:  # every rank of a node sends its own boundary at once
            t = self.alpha_s("inter", "sendrecv", 2) + coll.bytes / (self._inter_rank_gbps(self.ranks_per_node) * 1e9)
            return Priced(t, self._link_source("inter", "node.ranks_per_node"))
        t = self.alpha_s("intra", "sendrecv", 2) + coll.bytes / (self.intra_p2p * 1e9)
        return Priced(t, self.spec_source("network.intra.p2p_gbps", "network.intra.efficiency",
                                          "network.intra.latency"))

    def overlap(self, kind: str) -> Priced:
        return Priced(self._overlap[kind], self.spec_source(f"overlap.{kind}"))
