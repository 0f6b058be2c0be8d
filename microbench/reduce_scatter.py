"""Reduce-scatter probe: Megatron's sequence-parallel scatter of [mbs·s, d] over TP, the
ZeRO-1 gradient reduce-scatter of one DP bucket (flat buffers), or an nccl-tests size sweep.

    mpiexec -n 2 python -m microbench.reduce_scatter -b 1K -e 16M -f 4
    mpiexec -n 4 python -m microbench.reduce_scatter --model alcf-1t --tp 2 --dp 2            # tp_reduce_scatter
    mpiexec -n 4 python -m microbench.reduce_scatter --model alcf-1t --tp 2 --dp 2 --axis dp  # dp_reduce_scatter

S is the full *input* (nccl-tests); each rank keeps the sum of its S/n slice;
busbw = algbw·(n−1)/n. Bounded by the group's links for large S, by latency for small.
"in" writes the result into the rank's own slice of the input, as torch and NCCL allow.
"""
from __future__ import annotations

from typing import Any

from microbench.harness.collective import ShardedCollectiveProbe, count_wrong, pattern
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for


class ReduceScatter(ShardedCollectiveProbe):
    name = "reduce_scatter"
    module = "microbench.reduce_scatter"
    kind = "reduce_scatter"
    description = __doc__.splitlines()[0]

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        n, count, dt = len(case.group_ranks), case.fields["count"], case.fields["dtype"]
        chunk, idx = count // n, self.group_index(case, ctx.rank)
        send = pattern(count, rank=idx, seed=seed, dtype=dt, device=ctx.device, summands=n)
        recv = send.narrow(0, idx * chunk, chunk) if inplace else send.new_empty(chunk)
        return {"send": send, "recv": recv, "seed": seed, "group": self.group(ctx, case)}

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch.distributed as dist
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(state["recv"], state["send"], group=state["group"])

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        import torch
        n, count, dt = len(case.group_ranks), case.fields["count"], case.fields["dtype"]
        chunk, idx = count // n, self.group_index(case, ctx.rank)
        expected = torch.zeros(chunk, dtype=torch.float64, device=ctx.device)
        for r in range(n):
            expected += pattern(chunk, rank=r, seed=state["seed"], dtype=dt, device=ctx.device,
                                offset=idx * chunk, summands=n).double()
        return count_wrong(state["recv"], expected), chunk


if __name__ == "__main__":
    main_for(ReduceScatter())
