"""The host term of a measured profile (:class:`analysis.measured.MeasuredProfile`): the host
probe's rows (``microbench.host``) read, and one :class:`~microbench.model.workload.HostPath`
priced from them."""
from __future__ import annotations

from typing import Any

from analysis.provenance import extrapolated, measured
from analysis.system import Priced, SystemProfile
from microbench.model.workload import HostPath


def whole(v: Any) -> Any:
    """A size read back from a table (64.0 where a column held a NaN) as written (64)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def host_rows(df) -> dict[tuple[str, str], tuple[float, dict]]:
    """(path, phase) → (host seconds, the row). A layer's phase: the phase less its operations
    one by one (``host_us``), priced by the mean over iterations of the layer's time. The TP
    call (``op`` tp_call, under ("-", "tp_call")): the host clock around the call alone."""
    out: dict[tuple[str, str], tuple[float, dict]] = {}
    for _, r in df[df["kind"] == "host"].iterrows():
        if r.get("op") == "tp_call":
            out[("-", "tp_call")] = (float(r["host_us"]) * 1e-6, dict(r))
            continue
        ops_s = float(r.get("ops_us") or 0.0) * 1e-6
        out[(str(r.get("path")), str(r["phase"]))] = (max(0.0, float(r["_t_s"]) - ops_s), dict(r))
    return out


def price_host(h: HostPath, rows: dict[tuple[str, str], tuple[float, dict]], *, asynchronous: bool,
               attention_fused: bool, fallback: SystemProfile) -> Priced:
    """The host probe's phase, for the attention path the step takes (the other path's where
    that one was not measured). A TP collective's call: on a synchronous device (a CPU) inside
    the collective's measured time (the call returns when it is done), so nothing apart; on an
    asynchronous one the probe's ``tp_call`` row, else the fallback's."""
    if h.name == "tp_call":
        if not asynchronous:
            return Priced(0.0, measured("in the collective probe's time: on a synchronous device the call "
                                        "returns when the collective is done"))
        hit = rows.get(("-", "tp_call"))
        if hit is None:
            return fallback.host(h)
        seconds, row = hit
        return Priced(seconds, extrapolated(
            f"host probe's tp_call: the host clock around one TP reduction call, {seconds * 1e6:.1f} us at "
            f"{whole(row.get('elements'))} elements on {whole(row.get('group_size'))} ranks; taken as "
            f"size-independent (the call returns at enqueue)"))
    path = "fused" if attention_fused else "explicit"
    hit, how = rows.get((path, h.phase)), ""
    if hit is None:
        hit = next((v for (p, ph), v in rows.items() if ph == h.phase), None)
        how = f"; the {path} attention path was not measured, the other's used"
    if hit is None:
        return fallback.host(h)
    seconds, row = hit
    return Priced(seconds, extrapolated(
        f"host probe at hidden {whole(row.get('hidden'))} seq {whole(row.get('seq'))}: the layer's {h.phase} less its "
        f"operations one by one, {seconds * 1e6:.1f} us; host time taken as width-independent{how}"))
