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

from microbench.collective import bus_factor
from microbench.devices import DEVICES_FILE, match_device, spec_peak
from microbench.workload import Attention, Collective, Gemm, MemOp

from .errors import AnalysisError
from .fits import FIT_KEYS, Fit, collective_points, fit_alpha_beta, is_derived, time_s
from .provenance import display_path, extrapolated, measured, with_note
from .spec import SpecProfile, shipped_systems
from .system import COMPONENTS, SystemProfile


def _extra(row: Mapping[str, Any], key: str) -> Any:
    ex = row.get("extra")
    return ex.get(key) if isinstance(ex, Mapping) else None


def _frac(x: float) -> str:
    """0.0625 → '1/16' (scales are powers of two); else '%g'."""
    f = Fraction(x).limit_denominator(4096)
    return f"{f.numerator}/{f.denominator}" if f.denominator > 1 and abs(float(f) - x) < 1e-12 else f"{x:g}"


def _span(lo: float, hi: float) -> str:
    return f"at {lo:.4g} B" if lo == hi else f"over {lo:.4g}–{hi:.4g} B"


def select_ok_rows(df, *, include_failed: bool = False):
    """(ok rows, notes). Rows with ``status == 'failed'`` or ``num_wrong > 0`` are refused
    (AnalysisError naming how many and the flag) unless ``include_failed``: then they are
    left out and a note says how many. Skipped rows (not supported there) are left out and
    counted."""
    status = df["status"].fillna("ok") if "status" in df.columns else None
    wrong = df["num_wrong"].fillna(0).astype(float) > 0 if "num_wrong" in df.columns else None
    bad = (status == "failed") if status is not None else None
    if wrong is not None:
        bad = wrong if bad is None else (bad | wrong)
    notes = []
    n_bad = int(bad.sum()) if bad is not None else 0
    if n_bad:
        n_wrong = int(wrong.sum()) if wrong is not None else 0
        what = f"{n_bad} failed row(s) ({n_wrong} with num_wrong > 0)"
        if not include_failed:
            raise AnalysisError(f"profile rows: {what}; a failed case is not a measurement — "
                                f"rerun it, or pass --include-failed to leave them out and price "
                                f"from the rest")
        notes.append(f"left out {what} (--include-failed)")
        df = df[~bad]
    if status is not None:
        keep = df["status"].fillna("ok") == "ok"
        if (~keep).any():
            notes.append(f"left out {int((~keep).sum())} skipped row(s)")
        df = df[keep]
    return df, notes


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
        df = df.assign(_t_s=time_s(df))
        kind = df["kind"]
        g = df[(kind == "gemm") & ~is_derived(df)]
        if "op" in g.columns:
            g = g[g["op"].fillna("") != "peak"]
        if "concurrent" in g.columns and (g["concurrent"] == "all").any():
            g = g[g["concurrent"] != "one"]  # as in a step: every rank of the node busy
        for _, r in g.iterrows():
            key = (int(r["m"]), int(r["n"]), int(r["k"]), int(r.get("batch", 1) or 1), str(r["dtype"]))
            self.gemm_table[key] = float(r["_t_s"])
            rate = 2 * key[0] * key[1] * key[2] * key[3] / r["_t_s"] / 1e12
            self.max_gemm_tflops = max(self.max_gemm_tflops or 0.0, rate)
            if "scale" in r and r["scale"] == r["scale"] and r["scale"] is not None:
                self.gemm_scales.add(float(r["scale"]))
        # Attention: the rate of each path (fused / explicit) per phase. Which path a step
        # takes is the framework's choice (the spec's attention_fused), not the probe's.
        for _, r in df[kind == "attention"].iterrows():
            if r.get("flop") and r["_t_s"] > 0:
                path = r.get("path") if isinstance(r.get("path"), str) else _extra(r, "path")
                self.attention_rates.setdefault((str(path or "fused"), str(r["phase"])), []).append(
                    (float(r["flop"]), float(r["flop"]) / r["_t_s"]))
        mo = df[(kind == "memop") & df["bytes_moved"].notna()] if "bytes_moved" in df.columns else df.iloc[0:0]
        for op, grp in mo.groupby("op"):
            b = grp["bytes_moved"].astype(float)
            self.memop_fits[str(op)] = fit_alpha_beta(b, grp["_t_s"])
            self.memop_sizes[str(op)] = (float(b.min()), float(b.max()))
        if len(mo):
            b = mo["bytes_moved"].astype(float)
            self.memop_fits["*"] = fit_alpha_beta(b, mo["_t_s"])
            self.memop_sizes["*"] = (float(b.min()), float(b.max()))
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
        # Overlap: only the DP sync's. The probe runs a collective beside *independent*
        # GEMMs; Megatron's TP allreduces (no SP) feed the next op and stay on the critical
        # path whatever the hardware could overlap, so a tp-axis figure is not applied.
        for _, r in df[kind == "overlap"].iterrows():
            ef = _extra(r, "exposed_fraction")
            if ef is not None and r.get("axis") == "dp":
                ef = float(ef)
                if not math.isfinite(ef):
                    raise AnalysisError(f"overlap row {r.get('case')}: exposed_fraction is {ef}")
                v = min(1.0, max(0.0, ef))
                src = measured() if v == ef else measured(
                    f"exposed fraction {ef:.3g} clamped to {v:g}: the probe's noise put it outside [0, 1]")
                self._overlap["dp"] = (v, src)
        # MFU is against the nominal peak of the device the GEMMs ran on (the device table,
        # where the device is known), else against the best square GEMM it measured.
        if len(self.gemm_table) and "run_peak_tflops" in df.columns and df["run_peak_tflops"].notna().any():
            self.measured_peak_tflops = float(df["run_peak_tflops"].dropna().max())
            dev = str(df["run_device_name"].dropna().iloc[0]) if "run_device_name" in df.columns and \
                df["run_device_name"].notna().any() else None
            nominal = spec_peak(dev, self.fallback.dtype)
            if nominal:
                self.peak_tflops = nominal
                self._peak_source = (f"specified ({display_path(DEVICES_FILE)}: "
                                     f"{match_device(dev)}.peak_tflops.{self.fallback.dtype})")
            else:
                self.peak_tflops = self.measured_peak_tflops
                self._peak_source = measured(f"best square GEMM of the run; {dev or 'this device'} "
                                             f"is not in {display_path(DEVICES_FILE)}")

    # pricing and provenance ------------------------------------------------------------
    def _gemm(self, gemm: Gemm) -> tuple[float, str]:
        key = (gemm.m, gemm.n, gemm.k, gemm.batch, gemm.dtype)
        if key in self.gemm_table:
            return self.gemm_table[key], measured()
        same = [(k, t) for k, t in self.gemm_table.items() if k[4] == gemm.dtype]
        spec_t = self.fallback.gemm_time_s(gemm)
        if not same:
            return spec_t, self.fallback.gemm_source(gemm)
        # The spec model's shape dependence, corrected by the measured/spec ratio of the
        # nearest measured shapes (inverse-distance weights in log m, n, k).
        x = np.log([gemm.m, gemm.n, gemm.k * gemm.batch])
        pts = sorted(((float(np.linalg.norm(np.log([k[0], k[1], k[2] * k[3]]) - x)), k, t) for k, t in same),
                     key=lambda p: p[0])
        num = den = 0.0
        for dist, k, t in pts[:4]:
            ref = self.fallback.gemm_time_s(Gemm("ref", "fwd", k[0], k[1], k[2], k[3], k[4]))
            w = 1.0 / (dist + 1e-3)
            num += w * math.log(t / ref)
            den += w
        t = spec_t * math.exp(num / den)
        scale = ", ".join(f"scale {_frac(s)} → 1" for s in sorted(self.gemm_scales) if s != 1)
        src = extrapolated(f"{min(4, len(pts))} nearest of {len(same)} measured {gemm.dtype} GEMM shapes"
                           f"{' (' + scale + ')' if scale else ''} by the {self.fallback.where} shape model")
        # Never faster than the fastest GEMM this device did (its best square GEMM or any
        # measured layer GEMM, whichever is faster): a small measured shape says nothing of a
        # rate beyond that.
        ceiling = max(self.measured_peak_tflops or 0.0, self.max_gemm_tflops or 0.0)
        if ceiling and gemm.flop / t / 1e12 > ceiling:
            t2 = gemm.flop / (ceiling * 1e12)
            src = with_note(src, f"{gemm.flop / t / 1e12:.3g} TFLOP/s clamped to the fastest measured "
                                 f"{ceiling:.3g} TFLOP/s")
            t = t2
        return t, src

    def gemm_time_s(self, gemm: Gemm) -> float:
        return self._gemm(gemm)[0]

    def gemm_source(self, gemm: Gemm) -> str:
        return self._gemm(gemm)[1]

    def _attention(self, att: Attention) -> tuple[float, str]:
        path = "fused" if self.attention_fused else "explicit"
        pts = self.attention_rates.get((path, att.phase))
        how = ""
        if not pts:
            pts = [pt for (p, ph), v in self.attention_rates.items() if ph == att.phase for pt in v]
            how = f"; the {path} path was not measured, the other path's rate used"
        if not pts:
            return self.fallback.attention_time_s(att), self.fallback.attention_source(att)
        lf = math.log(att.flop)
        flop, rate = min(pts, key=lambda p: abs(math.log(p[0]) - lf))
        t = att.flop / rate
        if not how and math.isclose(flop, att.flop, rel_tol=1e-9):
            return t, measured()
        return t, extrapolated(f"rate measured at {flop:.3g} FLOP applied to {att.flop:.3g} FLOP{how}")

    def attention_time_s(self, att: Attention) -> float:
        return self._attention(att)[0]

    def attention_source(self, att: Attention) -> str:
        return self._attention(att)[1]

    @property
    def attention_fused(self) -> bool:
        return self.fallback.attention_fused

    def memop_time_s(self, op: MemOp) -> float:
        return self.bytes_time_s(op.bytes, op=op.name)

    def memop_source(self, op: MemOp) -> str:
        return self.bytes_source(op=op.name, nbytes=op.bytes)

    def bytes_time_s(self, nbytes: float, *, op: str = "copy") -> float:
        fit = self.memop_fits.get(op) or self.memop_fits.get("*")
        return fit.time_s(nbytes) if fit else self.fallback.bytes_time_s(nbytes, op=op)

    def bytes_source(self, *, op: str = "copy", nbytes: float | None = None) -> str:
        key = op if op in self.memop_fits else "*"
        if key not in self.memop_fits:
            return self.fallback.bytes_source(op=op)
        lo, hi = self.memop_sizes[key]
        what = f"{op}" if key == op else f"all memory-bound ops ({op} not measured)"
        if key == op and nbytes is not None and lo <= nbytes <= hi:
            return measured() if lo == hi else measured(f"α–β fit of {what} {_span(lo, hi)}")
        return extrapolated(f"α–β fit of {what} measured {_span(lo, hi)}"
                            + (f", priced at {nbytes:.4g} B" if nbytes is not None else ""))

    def _collective(self, coll: Collective, crosses_nodes: bool, num_groups: int,
                    ranks_per_node_in_group: int | None) -> tuple[float, str]:
        n = coll.group_size
        if n <= 1:
            return 0.0, measured("a group of one rank moves nothing")
        if coll.kind == "sendrecv":
            return self._p2p(coll, crosses_nodes)
        hit = self.collective_fits.get((coll.kind, n, crosses_nodes))
        if hit:
            fit, ng, lo, hi = hit
            t = fit.time_s(coll.bytes)
            groups = "" if ng >= num_groups else f"; {ng} of {num_groups} concurrent groups measured"
            if lo <= coll.bytes <= hi and not groups:
                return t, measured(f"α–β fit of {coll.kind} n={n} {_span(lo, hi)}")
            return t, extrapolated(f"α–β fit of {coll.kind} n={n} measured {_span(lo, hi)}, "
                                   f"priced at {coll.bytes:.4g} B{groups}")
        near = [(k[1], v) for k, v in self.collective_fits.items() if k[0] == coll.kind and k[2] == crosses_nodes]
        if near:  # nearest measured group size, bandwidth term rescaled by the bus factor
            m, (f, ng, lo, hi) = min(near, key=lambda p: abs(math.log(p[0] / n)))
            t = f.alpha_s + f.beta_s_per_byte * coll.bytes * bus_factor(coll.kind, n) / bus_factor(coll.kind, m)
            return t, extrapolated(f"{coll.kind} group size {m} → {n} by bus factor, α–β fit measured "
                                   f"{_span(lo, hi)}" + ("" if lo <= coll.bytes <= hi else
                                                         f", priced at {coll.bytes:.4g} B"))
        t = self.fallback.collective_time_s(coll, crosses_nodes=crosses_nodes, num_groups=num_groups,
                                            ranks_per_node_in_group=ranks_per_node_in_group)
        return t, self.fallback.collective_source(coll, crosses_nodes=crosses_nodes)

    def collective_time_s(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> float:
        return self._collective(coll, crosses_nodes, num_groups, ranks_per_node_in_group)[0]

    def collective_source(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> str:
        return self._collective(coll, crosses_nodes, num_groups, ranks_per_node_in_group)[1]

    def _p2p(self, coll: Collective, crosses_nodes: bool) -> tuple[float, str]:
        hit = self.p2p_fits.get(crosses_nodes)
        if not hit:
            return (self.fallback.p2p_time_s(coll, crosses_nodes=crosses_nodes),
                    self.fallback.p2p_source(crosses_nodes=crosses_nodes))
        fit, lo, hi = hit
        if lo <= coll.bytes <= hi:
            return fit.time_s(coll.bytes), measured(f"α–β fit of send/recv {_span(lo, hi)}")
        return fit.time_s(coll.bytes), extrapolated(f"α–β fit of send/recv measured {_span(lo, hi)}, "
                                                    f"priced at {coll.bytes:.4g} B")

    def p2p_time_s(self, coll: Collective, *, crosses_nodes: bool) -> float:
        return self._p2p(coll, crosses_nodes)[0]

    def p2p_source(self, *, crosses_nodes: bool, coll: Collective | None = None) -> str:
        if coll is not None:
            return self._p2p(coll, crosses_nodes)[1]
        return measured() if crosses_nodes in self.p2p_fits else self.fallback.p2p_source(crosses_nodes=crosses_nodes)

    def overlap(self, kind: str) -> float:
        return self._overlap[kind][0] if kind in self._overlap else self.fallback.overlap(kind)

    def overlap_source(self, kind: str) -> str:
        return self._overlap[kind][1] if kind in self._overlap else self.fallback.overlap_source(kind)

    def layer_overhead_time_s(self) -> float:
        return self.fallback.layer_overhead_time_s()

    def layer_overhead_source(self) -> str:
        return self.fallback.layer_overhead_source()

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
    return [c for c in COMPONENTS if c in have]


def load_profile(*, system: str | None = None, profile_dirs: list[str] | None = None,
                 include_failed: bool = False) -> SystemProfile:
    """The CLI's rule: ``--system`` alone → spec; ``--profile`` → measured over ``--system``
    (required: what the rows do not measure is specified by the user, never invented)."""
    spec = SpecProfile.from_yaml(system) if system else None
    if not profile_dirs:
        if spec is None:
            raise AnalysisError("give --system NAME (a spec) and/or --profile RUN_DIR (measured rows "
                                "over that spec)")
        return spec
    from .load import load
    return MeasuredProfile.from_rows(load(profile_dirs), fallback=spec, include_failed=include_failed,
                                     name=f"measured({','.join(map(str, profile_dirs))})")
