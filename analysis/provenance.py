"""Provenance: three words, and their detail.

Every priced component of a prediction, and every row of a profile, is one of

* ``measured`` — at exactly the shape and group that is priced;
* ``extrapolated (from what)`` — e.g. "group size 2 → 12 by bus factor", "scale 1/8 → 1";
* ``specified (file: key)`` — e.g. "specified (analysis/systems/aurora.yaml: network.inter.nic_gbps)".

Nothing is "defaulted" (DESIGN.md, Results). A clamp or a substitution is part of the detail
("measured (exposed fraction 1.07 clamped to 1)"). A source is a plain string whose first word
is one of :data:`PROVENANCE_WORDS`, so JSON and tables carry it as is; :class:`Ledger` adds up the
seconds of a prediction by word.
"""
from __future__ import annotations

import functools
import os
from collections import defaultdict
from pathlib import Path

from microbench.model.vocabulary import PROVENANCE_WORDS, word_of
from microbench.model.vocabulary import seconds_by_word as per_word

REPO = Path(__file__).resolve().parent.parent


def display_path(path: str | Path) -> str:
    """A spec file as the user would name it: relative to the repository when inside it."""
    if os.path.isabs(path):  # the same answer every time: cached (a prediction asks ~70×)
        return _display_absolute(str(path))
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=1024)
def _display_absolute(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def measured(detail: str | None = None) -> str:
    return f"measured ({detail})" if detail else "measured"


def extrapolated(detail: str) -> str:
    return f"extrapolated ({detail})"


def with_note(source: str, note: str) -> str:
    """``source`` with a clamp or substitution added to its detail."""
    if source.endswith(")"):
        return f"{source[:-1]}; {note})"
    return f"{source} ({note})"


class Ledger:
    """Seconds by (component, source) as a prediction prices its operations.

    A component's total in the step is not always the plain sum of what was priced (an
    overlap fraction multiplies, a window hides part of the DP sync): :meth:`shares` splits
    each component's final seconds over its sources in proportion to what they priced.
    """

    def __init__(self) -> None:
        self.raw: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, component: str, source: str, seconds: float) -> float:
        word_of(source)
        self.raw[component][source] += seconds
        return seconds

    def merge(self, component: str, other: str) -> None:
        """Charge everything priced under ``other`` to ``component`` as well (the bubble
        idles for the same mix of work as the stage it waits on)."""
        for src, t in list(self.raw[other].items()):
            self.raw[component][src] += t

    def shares(self, breakdown_s: dict[str, float]) -> dict[str, dict[str, float]]:
        """component → {source: seconds of the step}; sums to each component's total."""
        out: dict[str, dict[str, float]] = {}
        for comp, total in breakdown_s.items():
            raw = {s: t for s, t in self.raw.get(comp, {}).items() if t > 0}
            tot = sum(raw.values())
            if total <= 0:
                continue
            if tot <= 0:
                raise AssertionError(f"component {comp} has {total} s but nothing priced it")
            out[comp] = {s: total * t / tot for s, t in raw.items()}
        return out


def seconds_by_word(shares: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds of the step by provenance word, over every component's sources."""
    out = dict.fromkeys(PROVENANCE_WORDS, 0.0)
    for per in shares.values():
        for w, t in per_word(per).items():
            out[w] += t
    return out


def summarise(sources: list[str]) -> str:
    """One source for a component priced from several: the sources joined, worst word first
    (specified, extrapolated, measured), so a reader never sees 'measured' for a mix."""
    uniq = sorted(set(sources), key=lambda s: (-PROVENANCE_WORDS.index(word_of(s)), s))
    return "; ".join(uniq)
