"""Megatron's rank order, written once: TP varies fastest, then DP, then PP (Narayanan et al.
2021; Megatron-LM ``initialize_model_parallel``). The probes' process groups, the reference
step's and the predictor's group placement all read it from here."""
from __future__ import annotations

from dataclasses import dataclass

AXES = ("tp", "dp", "pp")


@dataclass(frozen=True)
class Grid:
    tp: int
    pp: int
    dp: int

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        return {"tp": rank % self.tp, "dp": (rank // self.tp) % self.dp,
                "pp": rank // (self.tp * self.dp)}

    def rank_of(self, *, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis`` ('tp', 'dp', 'pp' or 'world'), each a sorted rank list."""
        if axis == "world":
            return [list(range(self.size))]
        if axis not in AXES:
            raise ValueError(f"axis {axis!r}: choose tp, dp, pp or world")
        sizes = {"tp": self.tp, "dp": self.dp, "pp": self.pp}
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                out.append(sorted(self.rank_of(**{**fixed, axis: v}) for v in range(sizes[axis])))
        return sorted(out)
