"""What the predictor asks a system profile: the time of each workload operation together
with where that time came from (its provenance, :mod:`analysis.provenance`) — one method per
operation kind, each returning :class:`Priced`.

Two implementations: :class:`analysis.spec.SpecProfile` (a specification) and
:class:`analysis.measured.MeasuredProfile` (probe rows over a specification); and
:class:`WithHost`, any profile whose host time was measured apart (the real framework's
narrowed run in the Megatron-DeepSpeed cross-check).
"""
from __future__ import annotations

from typing import NamedTuple

from microbench.model.workload import Attention, Collective, Gemm, HostPath, MemOp, TpSync

from analysis.placement import Placement

COMPONENTS = ("peak", "memory", "gemm", "attention", "memop", "collective.intra", "collective.inter",
              "p2p.intra", "p2p.inter", "overlap.dp", "overlap.tp", "overlap.tp_wgrad", "host", "tp_sync")
"""What a profile prices; :meth:`SystemProfile.sources` has one entry for each."""


class Priced(NamedTuple):
    """An operation's seconds (or an overlap's exposed fraction) and their source."""

    seconds: float
    source: str


class SystemProfile:
    """Subclasses price each operation kind; :meth:`price` dispatches by the operation's type."""

    name: str = "?"
    peak_tflops: float
    """Nominal dense peak of one device (rank) in the model dtype, for MFU."""
    ranks_per_node: int
    device_memory_gib: float
    nodes: int | None
    """Nodes of the whole machine (None: the spec does not say)."""
    asynchronous: bool
    """The device queues kernels while the host runs ahead (GPU, XPU): a phase costs
    max(host, device). False (a CPU): host and device add."""
    host_sharing: tuple[float, str] | None = None
    """(σ, source): a rank's compute on a host whose cores its ranks oversubscribe runs at
    1/σ of its own core's pace (σ = ranks × threads / usable cores > 1, device cpu); None:
    each rank has its device (see :func:`analysis.placement.host_sharing`)."""

    def gemm(self, gemm: Gemm) -> Priced: raise NotImplementedError
    def attention(self, att: Attention) -> Priced: raise NotImplementedError
    def memop(self, op: MemOp) -> Priced: raise NotImplementedError
    def collective(self, coll: Collective, placement: Placement) -> Priced: raise NotImplementedError
    def p2p(self, coll: Collective, placement: Placement) -> Priced: raise NotImplementedError
    def host(self, h: HostPath) -> Priced: raise NotImplementedError
    def tp_sync(self, op: TpSync) -> Priced:
        """One TP reduction's in-step cost beyond its idle price, per call (the predictor counts)."""
        raise NotImplementedError
    def overlap(self, kind: str) -> Priced:
        """Exposed fraction (0 = fully hidden, 1 = fully exposed) of overlappable work ``kind``
        (``dp``, ``tp``, ``tp_wgrad``), and its source."""
        raise NotImplementedError
    @property
    def attention_fused(self) -> bool: raise NotImplementedError
    def sources(self) -> dict[str, str]:
        """One source per entry of :data:`COMPONENTS` (the profile as a whole; a prediction
        says per operation what it priced from where)."""
        raise NotImplementedError

    def price(self, op, placement: Placement | None = None) -> Priced:
        """One of any workload operation (the predictor multiplies by its count; a collective
        needs its group's placement)."""
        if isinstance(op, Gemm):
            return self.gemm(op)
        if isinstance(op, Attention):
            return self.attention(op)
        if isinstance(op, MemOp):
            return self.memop(op)
        if isinstance(op, HostPath):
            return self.host(op)
        if isinstance(op, TpSync):
            return self.tp_sync(op)
        if isinstance(op, Collective):
            assert placement is not None, op
            return self.p2p(op, placement) if op.kind == "sendrecv" else self.collective(op, placement)
        raise TypeError(f"no price for {type(op).__name__}")


class WithHost(SystemProfile):
    """``base`` with its host time replaced by a measurement made apart: seconds per layer per
    micro-batch in each phase, and their source. Everything else is ``base``'s."""

    def __init__(self, base: SystemProfile, per_phase_s: dict[str, float], source: str):
        self.base, self.per_phase_s, self.host_source = base, dict(per_phase_s), source
        for attr in ("name", "peak_tflops", "ranks_per_node", "device_memory_gib", "nodes", "asynchronous",
                     "host_sharing"):
            setattr(self, attr, getattr(base, attr))
        self.notes = list(getattr(base, "notes", []))

    def gemm(self, gemm): return self.base.gemm(gemm)
    def attention(self, att): return self.base.attention(att)
    def memop(self, op): return self.base.memop(op)
    def collective(self, coll, placement): return self.base.collective(coll, placement)
    def p2p(self, coll, placement): return self.base.p2p(coll, placement)
    def overlap(self, kind): return self.base.overlap(kind)
    def tp_sync(self, op): return self.base.tp_sync(op)
    @property
    def attention_fused(self) -> bool: return self.base.attention_fused

    def host(self, h: HostPath) -> Priced:
        if h.name == "tp_call":  # the measurement made apart includes the run's own calls
            return Priced(0.0, self.host_source)
        return Priced(self.per_phase_s.get(h.phase, 0.0), self.host_source)

    def sources(self) -> dict[str, str]:
        return {**self.base.sources(), "host": self.host_source}
