"""A system from its specification: the YAML schema and the spec profile that prices from it.

``analysis/systems/NAME.yaml`` is loaded into :class:`SystemSpec` (pydantic, strict): an
unknown key, a wrong type or a value out of range is refused with one line naming the file,
the line where YAML knows it, and the dotted key. Every knob is required — none has a default
in code — so a spec file is the whole truth about the system it describes. Device datasheet
figures (peaks, HBM bandwidth, memory, compute units) are not in the system file: it names
its device by key (``device: {model: A100-SXM4-80GB, dtype: bf16}``) and they come from the
one table ``microbench/devices.yaml``, so a peak is stated once.

Two top-level records are accepted and not priced: ``provenance`` (dotted key → where the
figure comes from; shown in every ``specified (…)`` source) and ``calibration`` (free form:
how a calibration fitted the knobs).

Pricing (:class:`SpecProfile`): peak rates with a GEMM efficiency model (tile and wave
quantization, small-k ramp, memory roofline), memory bandwidth, link bandwidth and latency
per tier (inside a node, between nodes with NICs per node) and hierarchical collectives.
"""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microbench.collective import bus_factor
from microbench.devices import DEVICES_FILE, DeviceTableError, device
from microbench.workload import Attention, Collective, Gemm, MemOp

from .errors import AnalysisError
from .provenance import display_path, specified
from .system import SystemProfile

SYSTEMS_DIR = Path(__file__).with_name("systems")

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Efficiency = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DeviceRef(_Strict):
    model: str
    """Key of ``microbench/devices.yaml`` (peaks, HBM bandwidth, memory, compute units)."""
    dtype: Literal["bf16", "fp16", "fp32"]
    """Training dtype: the peak that MFU is against."""


class Node(_Strict):
    ranks_per_node: PositiveInt


class EfficiencySpec(_Strict):
    gemm_max: Efficiency
    """Large tile-aligned GEMM, fraction of peak."""
    gemm_tile: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    """Output tile (m × n) of the tile/wave quantization model."""
    gemm_k_half: Positive
    """k at which the k-loop reaches half its asymptotic efficiency."""
    gemm_latency_us: Positive
    attention: Efficiency
    attention_fused: bool
    layer_overhead_us: NonNegative
    """Host/framework time per layer per micro-batch (0 allowed: none)."""
    memop: Efficiency
    memop_latency_us: Positive


class IntraLink(_Strict):
    busbw_gbps: Positive
    p2p_gbps: Positive
    efficiency: Efficiency
    latency_us: Positive


class InterLink(_Strict):
    nic_gbps: Positive
    nics_per_node: PositiveInt
    efficiency: Efficiency
    latency_us: Positive


class Network(_Strict):
    intra: IntraLink
    inter: InterLink


class Overlap(_Strict):
    """Exposed fraction of overlappable work (0 = hidden, 1 = exposed)."""
    dp: Fraction
    tp: Fraction
    tp_wgrad: Fraction


class SystemSpec(_Strict):
    name: str
    nodes: PositiveInt | None
    """Nodes of the whole machine; null where the spec describes a node type, not a machine."""
    device: DeviceRef
    node: Node
    efficiency: EfficiencySpec
    network: Network
    overlap: Overlap
    provenance: dict[str, str] | None = None
    """Record, not a knob: dotted key → source of the figure."""
    calibration: dict[str, Any] | None = None
    """Record, not a knob: how a calibration fitted the knobs."""


# ---------------------------------------------------------------------------------------------
# Loading

def shipped_systems() -> list[str]:
    return sorted(p.stem for p in SYSTEMS_DIR.glob("*.yaml"))


def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based line of the key at ``loc`` in YAML ``text`` (its nearest existing parent)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def validate_spec(data: Any, *, where: str, text: str | None = None) -> SystemSpec:
    """``data`` as a :class:`SystemSpec`, or AnalysisError: one line, file[:line], key, why."""
    if not isinstance(data, dict):
        raise AnalysisError(f"{where}: expected a mapping at top level, got {type(data).__name__}")
    try:
        spec = SystemSpec.model_validate(data)
    except ValidationError as e:
        # an unknown key first: a misspelled knob also shows up as the knob "missing"
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        first = errs[0]
        loc = tuple(first["loc"])
        line = _line_of(text, loc) if text else None
        key = _dotted_loc(loc)
        if first["type"] == "extra_forbidden":
            siblings = [m["loc"][-1] for m in errs if m["type"] == "missing" and m["loc"][:-1] == loc[:-1]]
            close = difflib.get_close_matches(str(loc[-1]), [str(x) for x in siblings], n=1)
            why = "unknown key" + (f" (did you mean {close[0]}?)" if close else
                                   " (the schema, with every key, is in analysis/spec.py)")
        elif first["type"] == "missing":
            why = "missing (every knob is required; none has a default in code)"
        else:
            why = f"{first['msg']}, got {first.get('input')!r}"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise AnalysisError(f"{where}{f':{line}' if line else ''}: {key}: {why}{more}") from None
    try:
        dev = device(spec.device.model)
    except DeviceTableError as e:
        raise AnalysisError(f"{where}: device.model: {e}") from None
    if spec.device.dtype not in dev["peak_tflops"]:
        raise AnalysisError(f"{where}: device.dtype: {spec.device.dtype!r} has no peak in "
                            f"{display_path(DEVICES_FILE)}: {spec.device.model}.peak_tflops")
    return spec


def read_spec(name_or_path: str | Path) -> tuple[dict[str, Any], str, Path]:
    """(raw mapping, YAML text, path) of a shipped system name or a YAML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SYSTEMS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise AnalysisError(f"unknown system {str(name_or_path)!r}; shipped: "
                            f"{', '.join(shipped_systems())} (or give a path to a YAML file)")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AnalysisError(f"{display_path(p)}{at}: YAML syntax error: {problem}") from None
    return data, text, p


def _get(d: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        if not isinstance(cur.get(part), dict):
            raise AnalysisError(f"knob {dotted}: {part!r} is not a section of the spec")
        cur = cur[part]
    cur[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Pricing

class SpecProfile(SystemProfile):
    """A system from its specification; every number lives in a YAML file, none in the code."""

    def __init__(self, spec: Mapping[str, Any], *, source: str = "<dict>", text: str | None = None):
        self.spec = copy.deepcopy(dict(spec))
        self.source = source
        where = display_path(source) if source != "<dict>" else source
        self.where = where
        s = validate_spec(self.spec, where=where, text=text)
        self.schema = s
        self.name = s.name
        self.nodes = s.nodes
        self.device_key = s.device.model
        dev = device(s.device.model)
        self._peaks = {str(k): float(v) for k, v in dev["peak_tflops"].items()}
        self.mem_bw_gbps = float(dev["mem_bw_gbps"])
        self.device_memory_gib = float(dev["memory_gib"])
        self.num_units = int(dev["compute_units"])
        self.ranks_per_node = s.node.ranks_per_node
        e = s.efficiency
        self.gemm_max = e.gemm_max
        self.gemm_tile = (e.gemm_tile[0], e.gemm_tile[1])
        self.gemm_k_half = e.gemm_k_half
        self.gemm_latency_s = e.gemm_latency_us * 1e-6
        self.attention_eff = e.attention
        self._attention_fused = e.attention_fused
        self.layer_overhead_s = e.layer_overhead_us * 1e-6
        self.memop_eff = e.memop
        self.memop_latency_s = e.memop_latency_us * 1e-6
        n = s.network
        self.intra_busbw = n.intra.busbw_gbps * n.intra.efficiency
        self.intra_p2p = n.intra.p2p_gbps * n.intra.efficiency
        self.intra_lat_s = n.intra.latency_us * 1e-6
        self.node_inter_gbps = n.inter.nic_gbps * n.inter.nics_per_node * n.inter.efficiency
        self.inter_lat_s = n.inter.latency_us * 1e-6
        self._overlap = {"dp": s.overlap.dp, "tp": s.overlap.tp, "tp_wgrad": s.overlap.tp_wgrad}
        self.dtype = s.device.dtype
        self.peak_tflops = self.peak_for(self.dtype)
        self.provenance_notes = dict(s.provenance or {})

    # construction ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> "SpecProfile":
        data, text, p = read_spec(name_or_path)
        return cls(data, source=str(p), text=text)

    def with_knobs(self, knobs: Mapping[str, Any]) -> "SpecProfile":
        """A copy with dotted keys replaced, e.g. ``{"efficiency.gemm_max": 0.7}``; the copy
        is validated like a file (an unknown knob is refused)."""
        spec = copy.deepcopy(self.spec)
        for k, v in knobs.items():
            _set(spec, k, v)
        return SpecProfile(spec, source=self.source)

    def knob(self, dotted: str, default: float | None = None) -> float:
        """A knob's value by dotted key (``efficiency.gemm_max``); KeyError if absent."""
        try:
            return float(_get(self.spec, dotted))
        except KeyError:
            if default is None:
                raise
            return default

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

    def gemm_source(self, gemm: Gemm) -> str:
        return self.spec_source(f"device:peak_tflops.{gemm.dtype}", "device:compute_units",
                                "device:mem_bw_gbps", "efficiency.gemm_max", "efficiency.gemm_tile",
                                "efficiency.gemm_k_half", "efficiency.gemm_latency_us", "efficiency.memop")

    def attention_source(self, att: Attention) -> str:
        if self._attention_fused:
            return self.spec_source(f"device:peak_tflops.{att.dtype}", "efficiency.attention",
                                    "efficiency.attention_fused", "efficiency.gemm_latency_us")
        # explicit: its batched GEMMs on the GEMM roofline (attention_time_s)
        return self.spec_source(f"device:peak_tflops.{att.dtype}", "device:compute_units", "device:mem_bw_gbps",
                                "efficiency.attention", "efficiency.attention_fused", "efficiency.gemm_tile",
                                "efficiency.gemm_k_half", "efficiency.gemm_latency_us", "efficiency.memop")

    def bytes_source(self, *, op: str = "copy", nbytes: float | None = None) -> str:
        return self.spec_source("device:mem_bw_gbps", "efficiency.memop", "efficiency.memop_latency_us")

    def collective_source(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> str:
        intra = ("network.intra.busbw_gbps", "network.intra.efficiency", "network.intra.latency_us")
        if not crosses_nodes:
            return self.spec_source(*intra)
        return self.spec_source(*intra, "network.inter.nic_gbps", "network.inter.nics_per_node",
                                "network.inter.efficiency", "network.inter.latency_us")

    def p2p_source(self, *, crosses_nodes: bool, coll: Collective | None = None) -> str:
        if crosses_nodes:
            return self.spec_source("network.inter.nic_gbps", "network.inter.nics_per_node",
                                    "network.inter.efficiency", "network.inter.latency_us",
                                    "node.ranks_per_node")
        return self.spec_source("network.intra.p2p_gbps", "network.intra.efficiency", "network.intra.latency_us")

    def overlap_source(self, kind: str) -> str:
        return self.spec_source(f"overlap.{kind}")

    def layer_overhead_source(self) -> str:
        return self.spec_source("efficiency.layer_overhead_us")

    def sources(self) -> dict[str, str]:
        g = Gemm("g", "fwd", 1, 1, 1, 1, self.dtype)
        c = Collective("c", "allreduce", "tp", 1, self.dtype, 1, "fwd", 2)
        return {"peak": self.spec_source(f"device:peak_tflops.{self.dtype}"),
                "memory": self.spec_source("device:memory_gib"),
                "gemm": self.gemm_source(g),
                "attention": self.attention_source(Attention("a", "fwd", 1, 1, 1, 1, self.dtype)),
                "memop": self.bytes_source(),
                "collective.intra": self.collective_source(c, crosses_nodes=False),
                "collective.inter": self.collective_source(c, crosses_nodes=True),
                "p2p.intra": self.p2p_source(crosses_nodes=False),
                "p2p.inter": self.p2p_source(crosses_nodes=True),
                **{f"overlap.{k}": self.overlap_source(k) for k in ("dp", "tp", "tp_wgrad")},
                "layer_overhead": self.layer_overhead_source()}

    # compute --------------------------------------------------------------------------
    def gemm_efficiency(self, gemm: Gemm) -> float:
        """Fraction of peak: gemm_max × tile quantization × wave quantization × k ramp.
        Tiles: the output is cut in tm×tn tiles, partial tiles cost full ones; waves: tiles run
        in waves of ``compute_units`` (NVIDIA's "wave quantization", GEMM performance guide);
        small k amortizes the epilogue badly: k/(k + k_half)."""
        tm, tn = self.gemm_tile
        mt, nt = math.ceil(gemm.m / tm), math.ceil(gemm.n / tn)
        q_tile = gemm.m * gemm.n / (mt * tm * nt * tn)
        tiles = mt * nt * gemm.batch
        waves = math.ceil(tiles / self.num_units)
        q_wave = tiles / (waves * self.num_units)
        k_ramp = gemm.k / (gemm.k + self.gemm_k_half)
        return self.gemm_max * q_tile * q_wave * k_ramp

    def gemm_time_s(self, gemm: Gemm, *, efficiency: float | None = None) -> float:
        """Roofline: the slower of the tensor-core time at the shape's efficiency and the
        minimum traffic at the memory-bound ops' achieved bandwidth; plus a fixed latency.
        ``efficiency`` replaces ``gemm_max`` (the attention's batched GEMMs use their own)."""
        eff = self.gemm_efficiency(gemm)
        if efficiency is not None:
            eff *= efficiency / self.gemm_max
        compute = gemm.flop / (self.peak_for(gemm.dtype) * 1e12 * eff)
        memory = gemm.bytes / (self.mem_bw_gbps * 1e9 * self.memop_eff)
        return max(compute, memory) + self.gemm_latency_s

    def attention_time_s(self, att: Attention) -> float:
        """Fused (flash) attention: causal FLOPs at a fixed fraction of peak. Explicit
        (unfused) attention, as Megatron's CoreAttention runs it: its batched GEMMs
        (``Attention.gemms``) one by one, each on the GEMM roofline at the attention
        efficiency. With k = head_dim the s×s score write costs about as much as the
        arithmetic (2·head_dim FLOP per 2 bytes), so it is priced, not assumed compute-bound
        (the softmax and dropout on the scores are separate memops)."""
        if self._attention_fused:
            flop = att.flop_causal if att.causal else att.flop
            return flop / (self.peak_for(att.dtype) * 1e12 * self.attention_eff) + self.gemm_latency_s
        return sum(self.gemm_time_s(g, efficiency=self.attention_eff) for g in att.gemms)

    @property
    def attention_fused(self) -> bool:
        return self._attention_fused

    def layer_overhead_time_s(self) -> float:
        return self.layer_overhead_s

    def memop_time_s(self, op: MemOp) -> float:
        return self.bytes_time_s(op.bytes, op=op.name)

    def bytes_time_s(self, nbytes: float, *, op: str = "copy") -> float:
        return nbytes / (self.mem_bw_gbps * 1e9 * self.memop_eff) + self.memop_latency_s

    # communication --------------------------------------------------------------------
    def _intra_s(self, kind: str, size: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return self.intra_lat_s + bus_factor(kind, n) * size / (self.intra_busbw * 1e9)

    def _inter_rank_gbps(self, active_ranks: int) -> float:
        return self.node_inter_gbps / max(1, min(active_ranks, self.ranks_per_node))

    def collective_time_s(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> float:
        n, size, kind = coll.group_size, float(coll.bytes), coll.kind
        if n <= 1:
            return 0.0
        if kind == "sendrecv":
            return self.p2p_time_s(coll, crosses_nodes=crosses_nodes)
        if not crosses_nodes:
            return self._intra_s(kind, size, n)
        # Hierarchical (NCCL/oneCCL two-level): intra-node reduce-scatter, inter-node
        # collective of S/r over the nodes with each rank on its own NIC share, intra allgather.
        r = max(1, min(ranks_per_node_in_group or 1, n))  # None: one rank of the group per node
        nodes = max(2, math.ceil(n / r))
        bw = self._inter_rank_gbps(r * max(1, num_groups)) * 1e9
        inter = bus_factor(kind, nodes) * (size / r) / bw + self.inter_lat_s * (1 + math.log2(nodes))
        intra = 0.0
        if r > 1:
            if kind == "allreduce":
                intra = self._intra_s("reduce_scatter", size, r) + self._intra_s("allgather", size, r)
            else:
                intra = self._intra_s(kind, size, r)
        return intra + inter

    def p2p_time_s(self, coll: Collective, *, crosses_nodes: bool) -> float:
        if crosses_nodes:  # every rank of a node sends its own boundary at once
            return self.inter_lat_s + coll.bytes / (self._inter_rank_gbps(self.ranks_per_node) * 1e9)
        return self.intra_lat_s + coll.bytes / (self.intra_p2p * 1e9)

    def overlap(self, kind: str) -> float:
        return self._overlap[kind]

