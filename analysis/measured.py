"""A profile built from probe rows (``analysis.load``), over a specification the user named.

A GEMM table by exact shape (shapes not measured are extrapolated with the spec model's shape
dependence, corrected by the nearest measured shapes), the attention core by its measured
rate, memory-bound ops by α–β fits of achieved time, collectives by α–β fits per kind, group
size, concurrent groups and placement (:func:`analysis.fits.collective_points`, the same
points the report draws). Whatever was not measured comes from the spec; with no spec named,
:func:`load_profile` refuses and names what is missing and the flag that supplies it.

Every priced operation has a source (:mod:`analysis.provenance`): ``measured`` only at
exactly the shape and group that is priced; ``extrapolated (from what)`` for a scaled-down
GEMM, another group size, a size past the sweep; ``specified (file: key)`` from the spec.
A clamp is part of the detail. Rows whose check failed are refused unless the caller lets
them be left out, and then the profile says how many were.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping

import numpy as np

from microbench.model.config import dtype_bytes
from microbench.model.devices import DEVICES_FILE, match_device, spec_peak
from microbench.model.metrics import bus_factor, tflops
from microbench.model.systems import shipped_systems
from microbench.model.vocabulary import STAND_IN
from microbench.model.workload import Attention, Collective, Gemm, HostPath, MemOp, TpSync

from analysis.errors import AnalysisError
from analysis.fits import FIT_KEYS, Fit, collective_points, fit_alpha_beta, is_derived, time_s
from analysis.load import select_ok_rows
from analysis.placement import Placement, host_sharing
from analysis.measured_host import host_rows, price_host
from analysis.measured_host import whole as _whole
from analysis.provenance import display_path, extrapolated, measured, with_note
from analysis.spec import SpecProfile
from analysis.system import COMPONENTS, Priced, SystemProfile


def _extra(row: Mapping[str, Any], key: str) -> Any:
    ex = row.get("extra")
    return ex.get(key) if isinstance(ex, Mapping) else None


def _frac(x: float) -> str:
    """0.0625 → '1/16' (scales are powers of two); else '%g'."""
    f = Fraction(x).limit_denominator(4096)
    return f"{f.numerator}/{f.denominator}" if f.denominator > 1 and abs(float(f) - x) < 1e-12 else f"{x:g}"


def _beyond(nbytes: float, lo: float, hi: float) -> str:
    return "" if lo <= nbytes <= hi else (", priced above it" if nbytes > hi else ", priced below it")


def _span(lo: float, hi: float) -> str:
    return f"at {lo:.4g} B" if lo == hi else f"over {lo:.4g}–{hi:.4g} B"


class MeasuredProfile(SystemProfile):
    """A profile built from probe rows; measured parts override the spec, and say so."""

    def __init__(self, fallback: SpecProfile, *, name: str = "measured"):
        self.fallback = fallback
        self.name = name
        self.peak_tflops = fallback.peak_tflops
        self.ranks_per_node = fallback.ranks_per_node
        self.device_memory_gib = fallback.device_memory_gib
        self.nodes = fallback.nodes
        self.notes: list[str] = []
        self.gemm_table: dict[tuple[int, int, int, int, str], float] = {}
        self.gemm_scales: set[float] = set()
        self.max_gemm_tflops: float | None = None
        self.attention_rates: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (path, phase) → [(flop, flop/s)]
        self.measured_peak_tflops: float | None = None
        self.memop_fits: dict[str, Fit] = {}
        self.memop_sizes: dict[str, tuple[float, float]] = {}
        self.collective_fits: dict[tuple[str, int, bool], tuple[Fit, int, float, float]] = {}
        """(kind, n, crosses) → (fit, num_groups, min bytes, max bytes) of the most concurrent groups."""
        self.p2p_fits: dict[bool, tuple[Fit, float, float]] = {}
        self._overlap: dict[str, tuple[float, str]] = {}
        self.host_rows: dict[tuple[str, str], tuple[float, dict]] = {}
        """(path, phase) → (host seconds, the row) of the host probe."""
        self.sync_rows: dict[tuple[int, int], dict] = {}
        """(group size, bytes of the reduction) → the tp_sync probe's row."""
        self.asynchronous = fallback.asynchronous
        self._peak_source = fallback.sources()["peak"]

    @classmethod
    def from_rows(cls, df, *, fallback: SpecProfile | str | None = None, name: str = "measured",
                  include_failed: bool = False) -> "MeasuredProfile":
        """``df``: rows from :func:`analysis.load`. ``fallback``: the spec for what the rows do
        not measure; None refuses (AnalysisError) naming the parts that would be missing."""
        df, notes = select_ok_rows(df, include_failed=include_failed)
        if df is None or len(df) == 0:
            raise AnalysisError("measured profile: no rows with status 'ok'")
        if isinstance(fallback, str):
            fallback = SpecProfile.from_yaml(fallback)
        if fallback is None:
            have = measured_components(df)
            lacking = [c for c in COMPONENTS if c not in have]
            raise AnalysisError(
                f"--profile measures {', '.join(have) or 'nothing priceable'} but not "
                f"{', '.join(lacking)}; give --system NAME (shipped: {', '.join(shipped_systems())}, "
                f"or a YAML path) to specify them")
        prof = cls(fallback, name=name)
        prof.notes += notes
        prof._ingest(df)
        return prof

    def _ingest(self, df) -> None:
        if "kind" not in df.columns:
            raise AnalysisError("measured rows have no 'kind' column")
        for col in ("run_device", "run_device_name"):
            if col in df.columns:
                seen = sorted(set(df[col].dropna().astype(str)))
                if len(seen) > 1:
                    raise AnalysisError(f"profile rows come from different devices ({col}: "
                                        f"{', '.join(seen)}): build one profile per machine")
        if "run_device" in df.columns and (df["run_device"] == "cpu").any():
            self.asynchronous = False  # a CPU runs each operation before the host goes on
        self.host_sharing = host_sharing(df)
        df = df.assign(_t_s=time_s(df))
        self._ingest_gemms(df)
        self._ingest_attention(df)
        self._ingest_memops(df)
        self._ingest_collectives(df)
        self._ingest_overlap(df)
        self._ingest_host(df)
        self._ingest_sync(df)
        self._ingest_peak(df)

    def _ingest_gemms(self, df) -> None:
        g = df[(df["kind"] == "gemm") & ~is_derived(df)]
        if "op" in g.columns:
            g = g[g["op"].fillna("") != "peak"]
        if "concurrent" in g.columns and (g["concurrent"] == "all").any():
            g = g[g["concurrent"] != "one"]  # as in a step: every rank of the node busy
        for _, r in g.iterrows():
            key = (int(r["m"]), int(r["n"]), int(r["k"]), int(r.get("batch", 1) or 1), str(r["dtype"]))
            self.gemm_table[key] = float(r["_t_s"])
            rate = tflops(2 * key[0] * key[1] * key[2] * key[3], r["_t_s"])
            self.max_gemm_tflops = max(self.max_gemm_tflops or 0.0, rate)
            if "scale" in r and r["scale"] == r["scale"] and r["scale"] is not None:
                self.gemm_scales.add(float(r["scale"]))

    def _ingest_attention(self, df) -> None:
        """The rate of each path (fused / explicit) per phase. Which path a step takes is the
        framework's choice (the spec's attention_fused), not the probe's."""
        rows = df[df["kind"] == "attention"]
        usable = rows[rows["flop"].notna() & (rows["flop"] > 0) & (rows["_t_s"] > 0)] if "flop" in rows else rows.iloc[0:0]
        if len(usable) < len(rows):  # NaN is true: a row without flop once priced attention at NaN
            self.notes.append(f"left out {len(rows) - len(usable)} attention row(s) without a flop count > 0 "
                              "and a time > 0 (nothing to take a rate from)")
        for _, r in usable.iterrows():
            path = r.get("path") if isinstance(r.get("path"), str) else _extra(r, "path")
            self.attention_rates.setdefault((str(path or "fused"), str(r["phase"])), []).append(
                (float(r["flop"]), float(r["flop"]) / r["_t_s"]))

    def _ingest_memops(self, df) -> None:
        mo = df[(df["kind"] == "memop") & df["bytes_moved"].notna()] if "bytes_moved" in df.columns else df.iloc[0:0]
        for op, grp in mo.groupby("op"):
            b = grp["bytes_moved"].astype(float)
            self.memop_fits[str(op)] = fit_alpha_beta(b, grp["_t_s"])
            self.memop_sizes[str(op)] = (float(b.min()), float(b.max()))
        if len(mo):
            b = mo["bytes_moved"].astype(float)
            self.memop_fits["*"] = fit_alpha_beta(b, mo["_t_s"])
            self.memop_sizes["*"] = (float(b.min()), float(b.max()))

    def _ingest_collectives(self, df) -> None:
        pts = collective_points(df.drop(columns=["_run"], errors="ignore"))
        for key, grp in (pts.groupby(list(FIT_KEYS)) if len(pts) else ()):
            k, n, ng, x = str(key[0]), int(key[1]), int(key[2]), bool(key[3])
            fit = fit_alpha_beta(grp["size_bytes"].astype(float), grp["_t_s"])
            lo, hi = float(grp["size_bytes"].min()), float(grp["size_bytes"].max())
            if k == "sendrecv":
                self.p2p_fits[x] = (fit, lo, hi)
                continue
            # a step runs every group of an axis at once: the most concurrent groups measured
            old = self.collective_fits.get((k, n, x))
            if old is None or ng > old[1]:
                self.collective_fits[(k, n, x)] = (fit, ng, lo, hi)

    def _ingest_overlap(self, df) -> None:
        """Only the DP sync's. The probe runs a collective beside *independent* GEMMs;
        Megatron's TP allreduces (no SP) feed the next op and stay on the critical path
        whatever the hardware could overlap, so a tp-axis figure is not applied."""
        for _, r in df[df["kind"] == "overlap"].iterrows():
            ef = _extra(r, "exposed_fraction")
            if ef is not None and r.get("axis") == "dp":
                ef = float(ef)
                if not math.isfinite(ef):
                    raise AnalysisError(f"overlap row {r.get('case')}: exposed_fraction is {ef}")
                v = min(1.0, max(0.0, ef))
                src = measured() if v == ef else measured(
                    f"exposed fraction {ef:.3g} clamped to {v:g}: the probe's noise put it outside [0, 1]")
                self._overlap["dp"] = (v, src)

    def _ingest_host(self, df) -> None:
        self.host_rows.update(host_rows(df))

    def _ingest_sync(self, df) -> None:
        """The tp_sync probe's rows, by group size and the reduction's bytes."""
        if "sync_us" not in df.columns:
            return
        for _, r in df[(df["kind"] == "tp_sync") & df["sync_us"].notna()].iterrows():
            nbytes = int(r["elements"]) * dtype_bytes(str(r["dtype"]))
            self.sync_rows[(int(r["group_size"]), nbytes)] = dict(r)

    def _ingest_peak(self, df) -> None:
        """MFU is against the nominal peak of the device the GEMMs ran on (the device table,
        where the device is known), else against the fastest GEMM it did, square or not."""
        if not (len(self.gemm_table) and "run_peak_tflops" in df.columns and df["run_peak_tflops"].notna().any()):
            return
        self.measured_peak_tflops = float(df["run_peak_tflops"].dropna().max())
        dev = str(df["run_device_name"].dropna().iloc[0]) if "run_device_name" in df.columns and \
            df["run_device_name"].notna().any() else None
        nominal = spec_peak(dev, self.fallback.dtype)
        if nominal:
            self.peak_tflops = nominal
            self._peak_source = (f"specified ({display_path(DEVICES_FILE)}: "
                                 f"{match_device(dev)}.peak_tflops.{self.fallback.dtype})")
            return
        best = max(self.measured_peak_tflops, self.max_gemm_tflops or 0.0)
        self.peak_tflops = best
        which = "the square peak GEMM" if best == self.measured_peak_tflops else \
            (f"a layer GEMM: the square peak GEMM's {self.measured_peak_tflops:.3g} TFLOP/s was slower")
        self._peak_source = measured(f"{best:.3g} TFLOP/s, the fastest GEMM of the run, {which}; "
                                     f"{dev or 'this device'} is not in {display_path(DEVICES_FILE)}")

    # pricing and provenance ------------------------------------------------------------
    def gemm(self, gemm: Gemm) -> Priced:
        key = (gemm.m, gemm.n, gemm.k, gemm.batch, gemm.dtype)
        if key in self.gemm_table:
            return Priced(self.gemm_table[key], measured())
        same = [(k, t) for k, t in self.gemm_table.items() if k[4] == gemm.dtype]
        spec = self.fallback.gemm(gemm)
        if not same:
            return spec
        # The spec model's shape dependence, corrected by the measured/spec ratio of the
        # nearest measured shapes (inverse-distance weights in log m, n, k).
        x = np.log([gemm.m, gemm.n, gemm.k * gemm.batch])
        pts = sorted(((float(np.linalg.norm(np.log([k[0], k[1], k[2] * k[3]]) - x)), k, t) for k, t in same),
                     key=lambda p: p[0])
        num = den = 0.0
        for dist, k, t in pts[:4]:
            ref = self.fallback.gemm_seconds(Gemm("ref", "fwd", k[0], k[1], k[2], k[3], k[4]))
            w = 1.0 / (dist + 1e-3)
            num += w * math.log(t / ref)
            den += w
        t = spec.seconds * math.exp(num / den)
        scale = ", ".join(f"scale {_frac(s)} → 1" for s in sorted(self.gemm_scales) if s != 1)
        src = extrapolated(f"{min(4, len(pts))} nearest of {len(same)} measured {gemm.dtype} GEMM shapes"
                           f"{' (' + scale + ')' if scale else ''} by the {self.fallback.where} shape model")
        # Never faster than the fastest GEMM this device did (its best square GEMM or any
        # measured layer GEMM, whichever is faster): a small measured shape says nothing of a
        # rate beyond that.
        ceiling = max(self.measured_peak_tflops or 0.0, self.max_gemm_tflops or 0.0)
        if ceiling and tflops(gemm.flop, t) > ceiling:
            # the per-shape rate before the clamp is left out of the text on purpose: one
            # source line for every GEMM so clamped (the table shows each GEMM's seconds)
            src = with_note(src, f"clamped to the fastest measured {ceiling:.3g} TFLOP/s")
            t = gemm.flop / (ceiling * 1e12)
        return Priced(t, src)

    def attention(self, att: Attention) -> Priced:
        path = "fused" if self.attention_fused else "explicit"
        pts = self.attention_rates.get((path, att.phase))
        how = ""
        if not pts:
            pts = [pt for (p, ph), v in self.attention_rates.items() if ph == att.phase for pt in v]
            how = f"; the {path} path was not measured, the other path's rate used"
        if not pts:
            return self.fallback.attention(att)
        lf = math.log(att.flop)
        flop, rate = min(pts, key=lambda p: abs(math.log(p[0]) - lf))
        t = att.flop / rate
        if not how and math.isclose(flop, att.flop, rel_tol=1e-9):
            return Priced(t, measured())
        return Priced(t, extrapolated(f"rate measured at {flop:.3g} FLOP applied to {att.flop:.3g} FLOP{how}"))

    @property
    def attention_fused(self) -> bool:
        return self.fallback.attention_fused

    def memop(self, op: MemOp) -> Priced:
        if op.name == "softmax" and not self.attention_fused and \
                ("explicit", "bwd" if op.phase == "bwd" else "fwd") in self.attention_rates:
            return Priced(0.0, measured(f"in the explicit attention probe's {op.phase} call, which times the scores' "
                                        "mask and softmax with Q·Kᵀ and P·V; not priced again"))
        key = next((k for k in (op.name, STAND_IN.get(op.name, ("*",))[0], "*") if k in self.memop_fits), None)
        if key is None:
            return self.fallback.memop(op)
        t, (lo, hi) = self.memop_fits[key].time_s(op.bytes), self.memop_sizes[key]
        what = op.name if key == op.name else f"all memory-bound ops ({op.name} not measured)" if key == "*" \
            else f"{key} ({op.name} not measured: {STAND_IN[op.name][1]})"
        if key == op.name and lo <= op.bytes <= hi:
            return Priced(t, measured() if lo == hi else measured(f"α–β fit of {what} {_span(lo, hi)}"))
        beyond = ", priced above it" if op.bytes > hi else ", priced below it" if op.bytes < lo else ""
        return Priced(t, extrapolated(f"α–β fit of {what} measured {_span(lo, hi)}{beyond}"))

    def collective(self, coll: Collective, placement: Placement) -> Priced:
        n, crosses = coll.group_size, placement.crosses_nodes
        if n <= 1:
            return Priced(0.0, measured("a group of one rank moves nothing"))
        hit = self.collective_fits.get((coll.kind, n, crosses))
        if hit:
            fit, ng, lo, hi = hit
            groups = "" if ng >= placement.num_groups else f"; {ng} of {placement.num_groups} concurrent groups measured"
            if lo <= coll.bytes <= hi and not groups:
                return Priced(fit.time_s(coll.bytes), measured(f"α–β fit of {coll.kind} n={n} {_span(lo, hi)}"))
            return Priced(fit.time_s(coll.bytes), extrapolated(
                f"α–β fit of {coll.kind} n={n} measured {_span(lo, hi)}{_beyond(coll.bytes, lo, hi)}{groups}"))
        near = [(k[1], v) for k, v in self.collective_fits.items() if k[0] == coll.kind and k[2] == crosses]
        if not near:
            return self.fallback.collective(coll, placement)
        # The nearest measured group size: the bandwidth term rescaled by the bus factor, the
        # per-call latency by the spec's group-size law (ring 2(n−1) steps, tree 2·log2 n).
        m, (f, _, lo, hi) = min(near, key=lambda p: abs(math.log(p[0] / n)))
        tier = "inter" if crosses else "intra"
        law_m, law_n = (self.fallback.alpha_s(tier, coll.kind, g) for g in (m, n))
        alpha = f.alpha_s * (law_n / law_m if law_m > 0 else 1.0)
        t = alpha + f.beta_s_per_byte * coll.bytes * bus_factor(coll.kind, n) / bus_factor(coll.kind, m)
        return Priced(t, extrapolated(
            f"{coll.kind} group size {m} → {n} by bus factor and the {self.fallback.latency[tier].law} "
            f"latency law, α–β fit measured {_span(lo, hi)}{_beyond(coll.bytes, lo, hi)}"))

    def p2p(self, coll: Collective, placement: Placement) -> Priced:
        hit = self.p2p_fits.get(placement.crosses_nodes)
        if not hit:
            return self.fallback.p2p(coll, placement)
        fit, lo, hi = hit
        if lo <= coll.bytes <= hi:
            return Priced(fit.time_s(coll.bytes), measured(f"α–β fit of send/recv {_span(lo, hi)}"))
        return Priced(fit.time_s(coll.bytes), extrapolated(f"α–β fit of send/recv measured {_span(lo, hi)}"
                                                           f"{_beyond(coll.bytes, lo, hi)}"))

    def overlap(self, kind: str) -> Priced:
        return Priced(*self._overlap[kind]) if kind in self._overlap else self.fallback.overlap(kind)

    def host(self, h: HostPath) -> Priced:
        return price_host(h, self.host_rows, asynchronous=self.asynchronous, attention_fused=self.attention_fused,
                          fallback=self.fallback)

    def tp_sync(self, op: TpSync) -> Priced:
        """The probe's in-step cost per reduction (its in-step call less the call after a
        barrier) at exactly this group size and size. It is made by the layer's work between
        reductions, not by the bytes, so another size (the framework probe's narrowed run,
        whose own waits are in its host time) is not priced from it: the spec answers."""
        r = self.sync_rows.get((op.group_size, op.bytes)) if op.kind == "allreduce" else None
        if r is None:
            return self.fallback.tp_sync(op)
        raw = float(r["sync_us"]) * 1e-6
        what = (f"tp_sync probe, n={op.group_size}, {_whole(r['layers'])} layers fwd+bwd: reduction in the step "
                f"{float(r['allreduce_in_step_us']):.0f} us − after a barrier {float(r['allreduce_alone_us']):.0f} us")
        if raw < 0:
            what += f"; {raw * 1e6:.0f} us clamped to 0"
        return Priced(max(raw, 0.0), measured(what))

    def sources(self) -> dict[str, str]:
        """The profile as a whole: a component is ``measured`` where rows priced it, with what
        the rows cover; a prediction says per operation whether it was at the priced shape."""
        spec = self.fallback.sources()
        out = dict(spec)
        out["peak"] = self._peak_source
        if self.gemm_table:
            sc = ", ".join(_frac(s) for s in sorted(self.gemm_scales))
            out["gemm"] = measured(f"{len(self.gemm_table)} shapes" + (f" at scale {sc}" if sc else ""))
        if self.attention_rates:
            out["attention"] = measured(f"{sum(map(len, self.attention_rates.values()))} cases")
        if self.memop_fits:
            out["memop"] = measured(f"α–β fits of {', '.join(k for k in self.memop_fits if k != '*')}")
        for x, comp in ((False, "collective.intra"), (True, "collective.inter")):
            have = sorted(f"{k[0]} n={k[1]}" for k in self.collective_fits if k[2] == x)
            if have:
                out[comp] = measured(", ".join(have))
        for x, comp in ((False, "p2p.intra"), (True, "p2p.inter")):
            if x in self.p2p_fits:
                out[comp] = measured()
        for k, (_, src) in self._overlap.items():
            out[f"overlap.{k}"] = src
        if self.sync_rows:
            out["tp_sync"] = measured(f"tp_sync probe: {len(self.sync_rows)} case(s)")
        if self.host_rows:
            out["host"] = extrapolated(f"host probe: {len(self.host_rows)} phase(s) at a narrowed width")
        return out


def measured_components(df) -> list[str]:
    """Which of :data:`COMPONENTS` the rows measure (for the refusal without a spec)."""
    kind = df["kind"] if "kind" in df.columns else None
    if kind is None:
        return []
    have = []
    g = df[kind == "gemm"]
    if len(g) and "op" in g.columns and (g["op"] == "peak").any():
        have.append("peak")
    if len(g[g["op"].fillna("") != "peak"] if "op" in g.columns else g):
        have.append("gemm")
    if (kind == "attention").any():
        have.append("attention")
    if (kind == "memop").any():
        have.append("memop")
    pts = collective_points(df)
    for x, comp in () if pts.empty else ((False, "collective"), (True, "collective")):
        sub = pts[(pts["crosses_nodes"] == x)] if len(pts) else pts
        if len(sub) and (sub["kind"] != "sendrecv").any():
            have.append(f"{comp}.{'inter' if x else 'intra'}")
        if len(sub) and (sub["kind"] == "sendrecv").any():
            have.append(f"p2p.{'inter' if x else 'intra'}")
    if (kind == "overlap").any():
        have.append("overlap.dp")
    if (kind == "host").any():
        have.append("host")
    if (kind == "tp_sync").any():
        have.append("tp_sync")
    return [c for c in COMPONENTS if c in have]


def load_profile(*, system: str | None = None, profile_dirs: list[str] | None = None,
                 include_failed: bool = False, allow_incomplete: bool | None = None) -> SystemProfile:
    """The CLI's rule: ``--system`` alone → spec; ``--profile`` → measured over ``--system``
    (required: what the rows do not measure is specified by the user, never invented)."""
    spec = SpecProfile.from_yaml(system) if system else None
    if not profile_dirs:
        if spec is None:
            raise AnalysisError("give --system NAME (a spec) and/or --profile RUN_DIR (measured rows "
                                "over that spec)")
        return spec
    from analysis.load import load
    return MeasuredProfile.from_rows(load(profile_dirs, allow_incomplete=allow_incomplete), fallback=spec,
                                     include_failed=include_failed,
                                     name=f"measured({','.join(map(str, profile_dirs))})")
