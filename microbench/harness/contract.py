"""The probe contract, apart from the engine that runs it (nccl-tests keeps ``common.h`` apart
from the engine and each collective): what a probe declares — :class:`Probe` (its cases,
setup, the one call to time, the check, the rates), :class:`Case`, :class:`Context` (its view
of the world) and :class:`Skip`. The engine (:mod:`microbench.harness.engine`), its seams and
every probe import this module; it imports none of them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from microbench.model.config import TrainConfig
from microbench.model.grid import Grid
from microbench.runtime import results
from microbench.runtime.world import World


class Skip(Exception):
    """Raised by a probe's setup when a case is not supported here (recorded as skipped)."""


@dataclass
class Case:
    """One measured configuration. ``fields`` become row columns as they are."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    group_ranks: list[int] | None = None
    """Ranks of this rank's measured group (None: the probe has no group)."""
    active: bool = True
    """False for a rank that sits idle in this case (``--groups one``): it only barriers."""


class Probe:
    """What a probe declares. Subclass and override; keep it small."""

    name = "probe"
    module = "microbench.probe"
    description = ""
    columns: Sequence[tuple[str, str, str]] = ()
    """Table columns: (header, row key, format spec such as '>12.2f')."""
    default_iters = 20
    default_warmup = 5
    uses_model = True
    layout_matches_world = True
    """False for probes that measure one rank's shard of the layout (compute probes): the
    layout's tp×pp×dp need not equal the world; every rank runs the same shard at once and
    the grid is the world as one DP-like group."""
    footer_metric: str | None = None

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        pass

    def validate(self, args: argparse.Namespace) -> None:
        """Raise UsageError for bad probe-specific values (runs before any rank starts)."""

    def cases(self, ctx: "Context") -> Iterable[Case]:
        raise NotImplementedError

    def setup(self, ctx: "Context", case: Case, *, seed: int) -> Any:
        """Allocate and fill (never zeros) the case's buffers; may raise :class:`Skip`."""
        raise NotImplementedError

    def run(self, ctx: "Context", case: Case, state: Any) -> None:
        """The one call to time."""
        raise NotImplementedError

    def call(self, ctx: "Context", case: Case, state: Any) -> None:
        """What the harness times and checks: :meth:`run`, unless a base class dispatches
        (e.g. to another communication library for ``--backend mpi4py``)."""
        self.run(ctx, case, state)

    def prepare(self, ctx: "Context", case: Case, state: Any) -> None:
        """Called before every iteration, outside the timed region: e.g. evict a cache that
        the operation would not find warm inside a real step."""

    def finish(self, ctx: "Context", rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows derived from the measured ones after the last case (same on every rank):
        an extrapolated total, a ratio of cases. Written and printed like measured rows."""
        return []

    def check(self, ctx: "Context", case: Case, state: Any) -> tuple[int, int]:
        """(wrong, checked) elements after one run on fresh data."""
        return 0, 0

    def result(self, ctx: "Context", case: Case, state: Any) -> list:
        """The tensors :meth:`check` reads; ``MICROBENCH_FAULT=corrupt:…`` perturbs them
        between the checked call and the check, so every check is tested end to end."""
        return []

    def metrics(self, ctx: "Context", case: Case, time_s: float) -> dict[str, Any]:
        """Rates from the statistic's time (s): busbw, TFLOP/s, GB/s..."""
        return {}

    def manifest(self, ctx: "Context") -> dict[str, Any]:
        return {}

    def max_buffer_bytes(self, args: argparse.Namespace) -> int | None:
        """The largest single buffer one rank allocates, when known from the flags alone:
        checked against the rank's share of memory before any rank starts (a lower bound:
        a case may hold several such buffers). Default: the ``-e/--maxbytes`` of a sweep."""
        return getattr(args, "maxbytes_i", None)


@dataclass
class Context:
    args: argparse.Namespace
    world: World
    cfg: TrainConfig | None
    grid: Grid
    writer: results.RunWriter | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def device(self):
        return self.world.device

    def placement(self, axis: str, ranks: Sequence[int], num_groups: int) -> dict[str, Any]:
        return {"axis": axis, "group_size": len(ranks), "num_groups": num_groups,
                "ranks_per_node": self.world.ranks_per_node,
                "crosses_nodes": self.world.crosses_nodes(ranks)}
