"""Alltoall probe: an nccl-tests size sweep of all_to_all_single (no op of the dense
transformer step uses it; it is here for expert-parallel layouts and for comparison).

    mpiexec -n 4 python -m microbench.alltoall -b 1K -e 16M -f 4

S is the whole buffer each rank sends (n chunks of S/n, chunk j to rank j);
busbw = algbw·(n−1)/n. Bounded by the group's bisection for large S.
"""
from __future__ import annotations

import argparse
from typing import Any

from microbench.harness.collective import CollectiveProbe, count_wrong, pattern
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.runtime.errors import UsageError


class AllToAll(CollectiveProbe):
    name = "alltoall"
    module = "microbench.alltoall"
    kind = "alltoall"
    redop = "none"
    description = __doc__.splitlines()[0]

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if args.model is not None:
            raise UsageError(f"--model {args.model}: alltoall has no op in the dense step; "
                             "use a -b/-e/-f sweep")
        if args.place == "both":
            args.place = "out"
        elif args.place == "in":
            raise UsageError("--place in: torch's all_to_all_single is out-of-place only")

    def elements_multiple(self, n: int) -> int:
        return n

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        idx = self.group_index(case, ctx.rank)
        send = pattern(case.fields["count"], rank=idx, seed=seed, dtype=case.fields["dtype"],
                       device=ctx.device)
        return {"send": send, "recv": send.new_empty(send.numel()), "seed": seed,
                "group": self.group(ctx, case)}

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch.distributed as dist
        dist.all_to_all_single(state["recv"], state["send"], group=state["group"])

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        import torch
        n, count = len(case.group_ranks), case.fields["count"]
        chunk, idx = count // n, self.group_index(case, ctx.rank)
        # chunk j of the output is chunk idx of rank j's input
        expected = torch.cat([pattern(chunk, rank=j, seed=state["seed"], dtype=case.fields["dtype"],
                                      device=ctx.device, offset=idx * chunk) for j in range(n)])
        return count_wrong(state["recv"], expected), count


if __name__ == "__main__":
    main_for(AllToAll())
