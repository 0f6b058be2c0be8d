"""What the predictor asks a system profile: the time of each workload operation, and where
that time came from (its provenance, :mod:`analysis.provenance`).

Two implementations: :class:`analysis.spec.SpecProfile` (a specification) and
:class:`analysis.measured.MeasuredProfile` (probe rows over a specification).
"""
from __future__ import annotations

from microbench.workload import Attention, Collective, Gemm, MemOp

COMPONENTS = ("peak", "memory", "gemm", "attention", "memop", "collective.intra", "collective.inter",
              "p2p.intra", "p2p.inter", "overlap.dp", "overlap.tp", "overlap.tp_wgrad", "layer_overhead")
"""What a profile prices; :meth:`SystemProfile.sources` has one entry for each."""


class SystemProfile:
    """Subclasses fill in the timing methods and, beside each, its source."""

    name: str = "?"
    peak_tflops: float
    """Nominal dense peak of one device (rank) in the model dtype, for MFU."""
    ranks_per_node: int
    device_memory_gib: float
    nodes: int | None
    """Nodes of the whole machine (None: the spec does not say)."""

    # timing ---------------------------------------------------------------------------
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
        (``dp``, ``tp``, ``tp_wgrad``)."""
        raise NotImplementedError
    @property
    def attention_fused(self) -> bool: raise NotImplementedError
    def layer_overhead_time_s(self) -> float:
        """Host/framework time per layer per micro-batch (forward + backward) not hidden by
        the device queue (kernel launches, Python)."""
        raise NotImplementedError

    # provenance (analysis.provenance): one source string per priced operation ------------
    def gemm_source(self, gemm: Gemm) -> str: raise NotImplementedError
    def attention_source(self, att: Attention) -> str: raise NotImplementedError
    def bytes_source(self, *, op: str = "copy", nbytes: float | None = None) -> str: raise NotImplementedError
    def collective_source(self, coll: Collective, *, crosses_nodes: bool, num_groups: int = 1,
                          ranks_per_node_in_group: int | None = None) -> str:
        raise NotImplementedError
    def p2p_source(self, *, crosses_nodes: bool, coll: Collective | None = None) -> str:
        raise NotImplementedError
    def overlap_source(self, kind: str) -> str: raise NotImplementedError
    def layer_overhead_source(self) -> str: raise NotImplementedError
    def sources(self) -> dict[str, str]:
        """One source per entry of :data:`COMPONENTS` (the profile as a whole; a prediction
        says per operation what it priced from where)."""
        raise NotImplementedError
