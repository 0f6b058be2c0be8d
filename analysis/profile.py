"""System profiles: how long each workload operation takes on one system.

Two sources, one interface (:class:`SystemProfile`):

* :class:`SpecProfile` — from a specification (``analysis/systems/NAME.yaml``): peak rates
  with a GEMM efficiency model (tile and wave quantization, small-k ramp, memory roofline),
  memory bandwidth, link bandwidth and latency per tier (inside a node, between nodes with
  NICs per node) and hierarchical collectives across tiers.
* :class:`MeasuredProfile` — from probe rows (``analysis.load``): a GEMM table by exact shape
  (shapes not measured are priced by the spec model corrected by the nearest measured
  shapes), memory-bound ops by achieved bandwidth, and α–β fits per collective kind, group
  size and placement. Whatever was not measured comes from a fallback spec, and
  :meth:`SystemProfile.sources` says which part came from where.

Placement (does a group cross nodes, how many of its ranks share a node) is the caller's:
:func:`group_placement` derives it from the layout in Megatron's order (tp fastest, then dp,
then pp) and the system's ranks per node.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from microbench.config import TrainConfig
from microbench.workload import Attention, Collective, Gemm, MemOp

from .fits import Fit, fit_alpha_beta

SYSTEMS_DIR = Path(__file__).with_name("systems")


def shipped_systems() -> list[str]:
    return sorted(p.stem for p in SYSTEMS_DIR.glob("*.yaml"))


def bus_factor(kind: str, n: int) -> float:
    """nccl-tests bus-bandwidth factor (DESIGN.md): bytes each rank moves per byte of S."""
    if n <= 1:
        return 0.0
    if kind == "allreduce":
        return 2 * (n - 1) / n
    if kind in ("allgather", "reduce_scatter", "alltoall"):
        return (n - 1) / n
    return 1.0  # broadcast, reduce, sendrecv


@dataclass(frozen=True, slots=True)
class Placement:
    crosses_nodes: bool
    ranks_per_node_in_group: int
    """Ranks of one group that share a node (the intra-node part of a hierarchical collective)."""
    num_nodes: int
    """Nodes one group spans."""
    num_groups: int
    """Groups of this axis running at once (all of them, in a training step)."""


@functools.lru_cache(maxsize=65536)  # pure in its (frozen, hashable) arguments; calibration asks it 10⁵ times
def group_placement(cfg: TrainConfig, axis: str, *, ranks_per_node: int) -> Placement:
    """Where the groups of ``axis`` live, Megatron order: rank = t + tp·(d + dp·p).

    Every group is looked at (TP 8 on 12-rank nodes keeps group 0 inside a node but splits
    group 1): a collective runs as slow as its worst group, so the placement is the worst
    one — crosses nodes if any group does, the fewest ranks per node, the most nodes. A
    group's node pattern depends only on its first rank modulo the node size, so at most
    ranks_per_node distinct starts need looking at.
    """
    p = cfg.parallel
    size, stride = {"tp": (p.tp, 1), "dp": (p.dp, p.tp), "pp": (p.pp, p.tp * p.dp)}[axis]
    rpn = ranks_per_node if ranks_per_node > 0 else p.world_size
    if axis == "tp":
        starts = {(p.tp * j) % rpn for j in range(min(p.dp * p.pp, rpn))}
    elif axis == "dp":
        starts = {(t + p.tp * p.dp * k) % rpn for t in range(p.tp) for k in range(min(p.pp, rpn))}
    else:
        starts = {(t + p.tp * d) % rpn for t in range(p.tp) for d in range(min(p.dp, rpn))}
    worst_nodes, fewest = 1, size
    for r in starts:
        per_node: dict[int, int] = {}
        for i in range(size):
            node = (r + i * stride) // rpn
            per_node[node] = per_node.get(node, 0) + 1
        worst_nodes = max(worst_nodes, len(per_node))
        fewest = min(fewest, min(per_node.values()))
    return Placement(crosses_nodes=worst_nodes > 1, ranks_per_node_in_group=max(1, fewest),
                     num_nodes=worst_nodes, num_groups=p.world_size // size)


class SystemProfile:
    """What the predictor asks. Subclasses fill in the timing methods."""

    name: str = "?"
    peak_tflops: float
    """Nominal dense peak of one device (rank) in the model dtype, for MFU."""
    ranks_per_node: int
    device_memory_gib: float

    def gemm_time_s(self, gemm: Gemm) -> float: raise NotImplementedError
    def attention_time_s(self, att: Attention) -> float: raise NotImplementedError
    def memop_time_s(self, op: MemOp) -> float: raise NotImplementedError
    def bytes_time_s(self, nbytes: float, *, op: str = "copy") -> float: raise NotImplementedError
    def collective_time_s(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> float:
        raise NotImplementedError
    def p2p_time_s(self, coll: Collective, *, crosses_nodes: bool) -> float: raise NotImplementedError
    def overlap(self, kind: str) -> float:
        """Exposed fraction (0 = fully hidden, 1 = fully exposed) of overlappable work ``kind``
        (``dp``, ``tp``, ``tp_wgrad``, ``pp``)."""
        raise NotImplementedError
    @property
    def attention_fused(self) -> bool: return True
    def layer_overhead_time_s(self) -> float:
        """Host/framework time per layer per micro-batch (forward + backward) not hidden by
        the device queue (kernel launches, Python); 0 unless a profile says otherwise."""
        return 0.0
    def sources(self) -> dict[str, str]: raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Specified

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
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


class SpecProfile(SystemProfile):
    """A system from its specification; every number lives in the YAML, none in the code."""

    REQUIRED = ("device.peak_tflops", "device.mem_bw_gbps", "device.memory_gib",
                "node.ranks_per_node", "network.intra.busbw_gbps", "network.inter.nic_gbps",
                "network.inter.nics_per_node")

    def __init__(self, spec: Mapping[str, Any], *, source: str = "<dict>"):
        self.spec = copy.deepcopy(dict(spec))
        self.source = source
        for key in self.REQUIRED:
            try:
                _get(self.spec, key)
            except KeyError:
                raise ValueError(f"system spec {source}: missing {key}") from None
        s = self.spec
        self.name = str(s.get("name", Path(source).stem))
        self._peaks: dict[str, float] = {str(k): float(v) for k, v in s["device"]["peak_tflops"].items()}
        self.mem_bw_gbps = float(s["device"]["mem_bw_gbps"])
        self.device_memory_gib = float(s["device"]["memory_gib"])
        self.ranks_per_node = int(s["node"]["ranks_per_node"])
        self.num_units = int(s["device"].get("compute_units", 1))
        e = s.get("efficiency", {})
        self.gemm_max = float(e.get("gemm_max", 0.8))
        self.gemm_tile = tuple(int(x) for x in e.get("gemm_tile", (128, 128)))
        self.gemm_k_half = float(e.get("gemm_k_half", 64))
        self.gemm_latency_s = float(e.get("gemm_latency_us", 5)) * 1e-6
        self.attention_eff = float(e.get("attention", 0.5))
        self._attention_fused = bool(e.get("attention_fused", True))
        self.layer_overhead_s = float(e.get("layer_overhead_us", 0.0)) * 1e-6
        self.memop_eff = float(e.get("memop", 0.8))
        self.memop_latency_s = float(e.get("memop_latency_us", 5)) * 1e-6
        n = s["network"]
        self.intra_busbw = float(n["intra"]["busbw_gbps"]) * float(n["intra"].get("efficiency", 1.0))
        self.intra_p2p = float(n["intra"].get("p2p_gbps", n["intra"]["busbw_gbps"])) * \
            float(n["intra"].get("efficiency", 1.0))
        self.intra_lat_s = float(n["intra"].get("latency_us", 10)) * 1e-6
        self.node_inter_gbps = (float(n["inter"]["nic_gbps"]) * int(n["inter"]["nics_per_node"])
                                * float(n["inter"].get("efficiency", 1.0)))
        self.inter_lat_s = float(n["inter"].get("latency_us", 20)) * 1e-6
        self._overlap = {str(k): float(v) for k, v in s.get("overlap", {}).items()}
        self.dtype = str(s["device"].get("dtype", "bf16"))
        self.peak_tflops = self.peak_for(self.dtype)

    # construction ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> "SpecProfile":
        p = Path(name_or_path)
        if not p.suffix:
            p = SYSTEMS_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ValueError(f"unknown system {str(name_or_path)!r}; shipped: "
                             f"{', '.join(shipped_systems())} (or give a path to a YAML file)")
        with open(p) as fh:
            spec = yaml.safe_load(fh)
        if not isinstance(spec, dict):
            raise ValueError(f"system spec {p}: expected a mapping at top level")
        return cls(spec, source=str(p))

    def with_knobs(self, knobs: Mapping[str, float]) -> "SpecProfile":
        """A copy with dotted keys replaced, e.g. ``{"efficiency.gemm_max": 0.7}``."""
        spec = copy.deepcopy(self.spec)
        for k, v in knobs.items():
            _set(spec, k, v)
        return SpecProfile(spec, source=self.source)

    def knob(self, dotted: str, default: float | None = None) -> float:
        try:
            return float(_get(self.spec, dotted))
        except KeyError:
            if default is None:
                raise
            return default

    def peak_for(self, dtype: str) -> float:
        if dtype in self._peaks:
            return self._peaks[dtype]
        raise ValueError(f"system {self.name}: no peak_tflops for dtype {dtype!r}; "
                         f"has {', '.join(self._peaks)}")

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

    def gemm_time_s(self, gemm: Gemm) -> float:
        compute = gemm.flop / (self.peak_for(gemm.dtype) * 1e12 * self.gemm_efficiency(gemm))
        memory = gemm.bytes / (self.mem_bw_gbps * 1e9 * self.memop_eff)  # roofline
        return max(compute, memory) + self.gemm_latency_s

    def attention_time_s(self, att: Attention) -> float:
        """Fused (flash) attention: causal FLOPs at a fixed fraction of peak. Explicit
        (unfused) attention: the full s×s score and context batched GEMMs, priced with the
        GEMM quantization model at the attention efficiency (the softmax is a separate memop)."""
        if self._attention_fused:
            flop = att.flop_causal if att.causal else att.flop
            return flop / (self.peak_for(att.dtype) * 1e12 * self.attention_eff) + self.gemm_latency_s
        scores = Gemm("attention_scores", "fwd", att.seq, att.seq, att.head_dim, att.batch * att.heads, att.dtype)
        q = self.gemm_efficiency(scores) / self.gemm_max
        passes = 2 if att.phase == "fwd" else 4  # Q·Kᵀ and P·V; backward twice that
        return att.flop / (self.peak_for(att.dtype) * 1e12 * self.attention_eff * q) + passes * self.gemm_latency_s

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
        r = ranks_per_node_in_group or 1
        r = max(1, min(r, n))
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
        return self._overlap.get(kind, 1.0)

    def sources(self) -> dict[str, str]:
        return {c: "specified" for c in COMPONENTS}


COMPONENTS = ("peak", "gemm", "attention", "memop", "collective.intra", "collective.inter",
              "p2p.intra", "p2p.inter", "overlap")


# ---------------------------------------------------------------------------------------------
# Measured

def _time_col(df) -> "Any":
    """The per-iteration *mean* where a row has one: a step is a sum of many operations, and
    the expectation of a sum is the sum of the means. The median a probe reports leaves out
    the slow tail that every long sequence of collectives meets (on a shared CPU the mean of
    a small gloo allreduce is 1.5–3× its median). Rows without a mean (derived rows, a
    ceiling measured as its best iteration) fall back to their reported time."""
    if "time_us" not in df.columns and "time_us_median" not in df.columns:
        raise ValueError("measured rows have no time_us or time_us_median column")
    reported = df["time_us"] if "time_us" in df.columns else df["time_us_median"]
    if "time_us_mean" in df.columns:
        return df["time_us_mean"].astype(float).fillna(reported.astype(float))
    return reported.astype(float)


def _extra(row: Mapping[str, Any], key: str) -> Any:
    ex = row.get("extra")
    return ex.get(key) if isinstance(ex, Mapping) else None


class MeasuredProfile(SystemProfile):
    """A profile built from probe rows; measured parts override the fallback spec."""

    def __init__(self, fallback: SpecProfile, *, name: str = "measured"):
        self.fallback = fallback
        self.name = name
        self.peak_tflops = fallback.peak_tflops
        self.ranks_per_node = fallback.ranks_per_node
        self.device_memory_gib = fallback.device_memory_gib
        self.gemm_table: dict[tuple[int, int, int, int, str], float] = {}
        self.attention_rates: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (path, phase) → [(flop, flop/s)]
        self.measured_peak_tflops: float | None = None
        self.memop_fits: dict[str, Fit] = {}
        self.collective_fits: dict[tuple[str, int, bool], Fit] = {}
        self.p2p_fits: dict[bool, Fit] = {}
        self._overlap: dict[str, float] = {}
        self._sources = fallback.sources()

    @classmethod
    def from_rows(cls, df, *, fallback: SpecProfile | str | None = None,
                  name: str = "measured") -> "MeasuredProfile":
        """``df``: rows from :func:`analysis.load`; only ``status == 'ok'`` rows are used.
        Without a fallback, a minimal spec is built from the measured peaks."""
        if "status" in df.columns:
            df = df[df["status"].fillna("ok") == "ok"]
        if df is None or len(df) == 0:
            raise ValueError("MeasuredProfile.from_rows: no rows with status 'ok'")
        if isinstance(fallback, str):
            fallback = SpecProfile.from_yaml(fallback)
        own_node = fallback is None
        if fallback is None:
            fallback = _minimal_spec(df)
        prof = cls(fallback, name=name)
        prof._ingest(df.assign(_t_s=_time_col(df) * 1e-6), own_node=own_node)
        return prof

    def _ingest(self, df, *, own_node: bool = True) -> None:
        kind = df["kind"] if "kind" in df.columns else None
        if kind is None:
            raise ValueError("measured rows have no 'kind' column")
        for col in ("run_device", "run_device_name"):
            if col in df.columns:
                seen = sorted(set(df[col].dropna().astype(str)))
                if len(seen) > 1:
                    raise ValueError(f"profile rows come from different devices ({col}: "
                                     f"{', '.join(seen)}): build one profile per machine")
        g = df[kind == "gemm"]
        if "op" in g.columns:
            g = g[g["op"].fillna("") != "peak"]
        if "concurrent" in g.columns and (g["concurrent"] == "all").any():
            g = g[g["concurrent"] != "one"]  # as in a step: every rank of the node busy
        for _, r in g.iterrows():
            key = (int(r["m"]), int(r["n"]), int(r["k"]), int(r.get("batch", 1) or 1), str(r.get("dtype", "bf16")))
            self.gemm_table[key] = r["_t_s"]
        if len(self.gemm_table):
            self._sources["gemm"] = "measured"
        # Attention: the rate of each path (fused / explicit) per phase. Which path a step
        # takes is the framework's choice (the spec's attention_fused), not the probe's.
        for _, r in df[kind == "attention"].iterrows():
            if r.get("flop") and r["_t_s"] > 0:
                path = r.get("path") if isinstance(r.get("path"), str) else _extra(r, "path")
                rate = float(r["flop"]) / r["_t_s"]
                self.attention_rates.setdefault((str(path or "fused"), str(r["phase"])), []).append(
                    (float(r["flop"]), rate))
        if self.attention_rates:
            self._sources["attention"] = "measured"
        mo = df[(kind == "memop") & df["bytes_moved"].notna()] if "bytes_moved" in df.columns else df.iloc[0:0]
        for op, grp in mo.groupby("op"):
            self.memop_fits[str(op)] = fit_alpha_beta(grp["bytes_moved"].astype(float), grp["_t_s"])
        if len(mo):
            self.memop_fits["*"] = fit_alpha_beta(mo["bytes_moved"].astype(float), mo["_t_s"])
            self._sources["memop"] = "measured"
        coll_kinds = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast")
        c = df[kind.isin(coll_kinds)]
        if len(c):
            c = c.assign(_x=c["crosses_nodes"].fillna(False).astype(bool) if "crosses_nodes" in c.columns else False)
            for (k, n, x), grp in c.groupby(["kind", "group_size", "_x"]):
                if "num_groups" in grp.columns and grp["num_groups"].notna().any():
                    # a step runs every group of an axis at once: prefer the rows measured so
                    # (--groups all) over a group alone, never fit the two together
                    grp = grp[grp["num_groups"] == grp["num_groups"].max()]
                self.collective_fits[(str(k), int(n), bool(x))] = fit_alpha_beta(grp["size_bytes"].astype(float), grp["_t_s"])
                self._sources["collective.inter" if x else "collective.intra"] = "measured"
        s = df[kind == "sendrecv"]
        if "mode" in s.columns and (s["mode"] == "oneway").any():
            # the predictor charges each direction on its own: price it from one-way transfers
            s = s[s["mode"] == "oneway"]
        if len(s):
            s = s.assign(_x=s["crosses_nodes"].fillna(False).astype(bool) if "crosses_nodes" in s.columns else False)
            for x, grp in s.groupby("_x"):
                self.p2p_fits[bool(x)] = fit_alpha_beta(grp["size_bytes"].astype(float), grp["_t_s"])
                self._sources["p2p.inter" if x else "p2p.intra"] = "measured"
        # Overlap: only the DP sync's. The probe runs a collective beside *independent*
        # GEMMs; Megatron's TP allreduces (no SP) feed the next op and stay on the critical
        # path whatever the hardware could overlap, so a tp-axis figure is not applied.
        o = df[kind == "overlap"]
        for _, r in o.iterrows():
            ef = _extra(r, "exposed_fraction")
            if ef is not None and r.get("axis") == "dp":
                self._overlap["dp"] = min(1.0, max(0.0, float(ef)))
                self._sources["overlap"] = "measured"
        # The node size of the target comes from the spec when there is one: a 2-rank run on a
        # laptop says nothing about how many tiles an Aurora node holds.
        if own_node and "ranks_per_node" in df.columns and df["ranks_per_node"].notna().any():
            self.ranks_per_node = int(df["ranks_per_node"].dropna().max())
        # GEMMs measured here: MFU is against the nominal peak of *this* device (its
        # datasheet, where the device is known), and no extrapolated GEMM may beat the best
        # square GEMM it measured.
        if len(self.gemm_table) and "run_peak_tflops" in df.columns and df["run_peak_tflops"].notna().any():
            from microbench.compute import spec_peak
            self.measured_peak_tflops = float(df["run_peak_tflops"].dropna().max())
            name = str(df["run_device_name"].dropna().iloc[0]) if "run_device_name" in df.columns and \
                df["run_device_name"].notna().any() else None
            nominal = spec_peak(name, getattr(self.fallback, "dtype", "bf16"))
            self.peak_tflops = nominal or self.measured_peak_tflops
            self._sources["peak"] = "specified" if nominal else "measured"

    # pricing --------------------------------------------------------------------------
    def gemm_time_s(self, gemm: Gemm) -> float:
        key = (gemm.m, gemm.n, gemm.k, gemm.batch, gemm.dtype)
        if key in self.gemm_table:
            return self.gemm_table[key]
        same = [(k, t) for k, t in self.gemm_table.items() if k[4] == gemm.dtype]
        spec_t = self.fallback.gemm_time_s(gemm)
        if not same:
            return spec_t
        # Interpolate: the spec model's shape dependence, corrected by the measured/spec
        # ratio of the nearest measured shapes (inverse-distance weights in log m, n, k).
        x = np.log([gemm.m, gemm.n, gemm.k * gemm.batch])
        pts = [(np.linalg.norm(np.log([k[0], k[1], k[2] * k[3]]) - x), k, t) for k, t in same]
        pts.sort(key=lambda p: p[0])
        num = den = 0.0
        for dist, k, t in pts[:4]:
            ref = self.fallback.gemm_time_s(Gemm("ref", "fwd", k[0], k[1], k[2], k[3], k[4]))
            w = 1.0 / (dist + 1e-3)
            num += w * math.log(t / ref)
            den += w
        t = spec_t * math.exp(num / den)
        # Extrapolating from small measured shapes with the spec's size dependence can promise
        # more than the device ever did: never faster than its measured ceiling.
        if self.measured_peak_tflops:
            t = max(t, gemm.flop / (self.measured_peak_tflops * 1e12))
        return t

    def attention_time_s(self, att: Attention) -> float:
        path = "fused" if self.attention_fused else "explicit"
        pts = self.attention_rates.get((path, att.phase)) or \
            [pt for (_, ph), v in self.attention_rates.items() if ph == att.phase for pt in v]
        if not pts:
            return self.fallback.attention_time_s(att)
        lf = math.log(att.flop)
        flop, rate = min(pts, key=lambda p: abs(math.log(p[0]) - lf))
        return att.flop / rate

    @property
    def attention_fused(self) -> bool:
        return self.fallback.attention_fused

    def memop_time_s(self, op: MemOp) -> float:
        return self.bytes_time_s(op.bytes, op=op.name)

    def bytes_time_s(self, nbytes: float, *, op: str = "copy") -> float:
        fit = self.memop_fits.get(op) or self.memop_fits.get("*")
        return fit.time_s(nbytes) if fit else self.fallback.bytes_time_s(nbytes, op=op)

    def collective_time_s(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> float:
        n = coll.group_size
        if n <= 1:
            return 0.0
        if coll.kind == "sendrecv":
            return self.p2p_time_s(coll, crosses_nodes=crosses_nodes)
        fit = self.collective_fits.get((coll.kind, n, crosses_nodes))
        if fit:
            return fit.time_s(coll.bytes)
        near = [(k[1], f) for k, f in self.collective_fits.items() if k[0] == coll.kind and k[2] == crosses_nodes]
        if near:  # nearest measured group size, bandwidth term rescaled by the bus factor
            m, f = min(near, key=lambda p: abs(math.log(p[0] / n)))
            if bus_factor(coll.kind, m) > 0:
                return f.alpha_s + f.beta_s_per_byte * coll.bytes * bus_factor(coll.kind, n) / bus_factor(coll.kind, m)
        return self.fallback.collective_time_s(coll, crosses_nodes=crosses_nodes, num_groups=num_groups,
                                               ranks_per_node_in_group=ranks_per_node_in_group)

    def p2p_time_s(self, coll: Collective, *, crosses_nodes: bool) -> float:
        fit = self.p2p_fits.get(crosses_nodes)
        return fit.time_s(coll.bytes) if fit else self.fallback.p2p_time_s(coll, crosses_nodes=crosses_nodes)

    def overlap(self, kind: str) -> float:
        return self._overlap.get(kind, self.fallback.overlap(kind))

    def layer_overhead_time_s(self) -> float:
        return self.fallback.layer_overhead_time_s()

    def sources(self) -> dict[str, str]:
        return dict(self._sources)


def _minimal_spec(df) -> SpecProfile:
    """A spec from measured peaks only, for a profile with no named system behind it."""
    peak = None
    if "run_peak_tflops" in df.columns and df["run_peak_tflops"].notna().any():
        peak = float(df["run_peak_tflops"].dropna().max())
    if peak is None and "tflops" in df.columns and df["tflops"].notna().any():
        peak = float(df["tflops"].dropna().max())
    bw = None
    if "run_peak_gbps" in df.columns and df["run_peak_gbps"].notna().any():
        bw = float(df["run_peak_gbps"].dropna().max())
    if bw is None and "gbps" in df.columns and df["gbps"].notna().any():
        bw = float(df["gbps"].dropna().max())
    if not peak or not bw:
        raise ValueError("measured rows carry no GEMM peak (tflops) or memory bandwidth (gbps); "
                         "give a fallback system with --system")
    dtypes = set(df["dtype"].dropna().astype(str)) if "dtype" in df.columns else {"bf16"}
    rpn = int(df["ranks_per_node"].dropna().max()) if "ranks_per_node" in df.columns and \
        df["ranks_per_node"].notna().any() else 1
    return SpecProfile({
        "name": "measured-minimal",
        "device": {"peak_tflops": {d: peak for d in dtypes | {"bf16", "fp16", "fp32"}},
                   "mem_bw_gbps": bw, "memory_gib": 1e9, "dtype": "bf16"},
        "node": {"ranks_per_node": rpn},
        "efficiency": {"gemm_max": 1.0, "memop": 1.0},
        "network": {"intra": {"busbw_gbps": 10.0}, "inter": {"nic_gbps": 1.0, "nics_per_node": 1}},
    }, source="<measured peaks>")


def load_profile(*, system: str | None = None, profile_dirs: list[str] | None = None) -> SystemProfile:
    """The CLI's rule: ``--system`` alone → spec; ``--profile`` → measured over the spec."""
    spec = SpecProfile.from_yaml(system) if system else None
    if not profile_dirs:
        if spec is None:
            raise ValueError("give --system NAME and/or --profile RUN_DIR")
        return spec
    from .load import load
    return MeasuredProfile.from_rows(load(profile_dirs), fallback=spec,
                                     name=f"measured({','.join(map(str, profile_dirs))})")
