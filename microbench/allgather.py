"""Allgather probe: Megatron's sequence-parallel gather of [mbs·s, d] over TP, the ZeRO-1
parameter allgather of one DP bucket, or an nccl-tests size sweep.

    mpiexec -n 2 python -m microbench.allgather -b 1K -e 16M -f 4
    mpiexec -n 4 python -m microbench.allgather --model alcf-1t --tp 2 --dp 2            # tp_allgather
    mpiexec -n 4 python -m microbench.allgather --model alcf-1t --tp 2 --dp 2 --axis dp  # dp_allgather

S is the full *output* (nccl-tests); each rank contributes S/n; busbw = algbw·(n−1)/n.
Bounded by the group's links for large S, by latency for small. "in" gathers into the
output buffer from the rank's own slice of it, as torch and NCCL allow.
"""
from __future__ import annotations

from typing import Any

from microbench.harness.collective import ShardedCollectiveProbe, count_wrong, pattern
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for
from microbench.harness.options import torch_dtype


class AllGather(ShardedCollectiveProbe):
    name = "allgather"
    module = "microbench.allgather"
    kind = "allgather"
    redop = "none"
    description = __doc__.splitlines()[0]

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        import torch
        n, count, dt = len(case.group_ranks), case.fields["count"], case.fields["dtype"]
        chunk, idx = count // n, self.group_index(case, ctx.rank)
        recv = torch.empty(count, dtype=torch_dtype(dt), device=ctx.device)
        mine = pattern(chunk, rank=idx, seed=seed, dtype=dt, device=ctx.device)
        if inplace:
            send = recv.narrow(0, idx * chunk, chunk)
            send.copy_(mine)
        else:
            send = mine
        return {"send": send, "recv": recv, "seed": seed, "group": self.group(ctx, case)}

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch.distributed as dist
        # all_gather_single (torch ≥ 2.10) is all_gather_into_tensor renamed
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(state["recv"], state["send"], group=state["group"])

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        import torch
        n, count, dt = len(case.group_ranks), case.fields["count"], case.fields["dtype"]
        chunk = count // n
        expected = torch.cat([pattern(chunk, rank=r, seed=state["seed"], dtype=dt, device=ctx.device)
                              for r in range(n)])
        return count_wrong(state["recv"], expected), count


if __name__ == "__main__":
    main_for(AllGather())
