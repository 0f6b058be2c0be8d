"""Allreduce probe: the TP allreduce of [mbs·s, d] activations, or an nccl-tests size sweep.

    mpiexec -n 2 python -m microbench.allreduce -b 1K -e 16M -f 4
    mpiexec -n 4 python -m microbench.allreduce --model alcf-1t --tp 2 --dp 2

Bounded by the link between the group's ranks (bus bandwidth) for large messages and by
latency for small ones. torch.distributed has no out-of-place allreduce: "out" copies the
send buffer into the receive buffer and reduces that in place, as a framework must.
"""
from __future__ import annotations

from typing import Any

from microbench.harness.collective import CollectiveProbe, count_wrong, pattern, tp_activation_elements
from microbench.harness.contract import Case, Context
from microbench.harness.engine import main_for


class AllReduce(CollectiveProbe):
    name = "allreduce"
    module = "microbench.allreduce"
    kind = "allreduce"
    description = __doc__.splitlines()[0]

    def model_elements(self, ctx: Context) -> tuple[str, int]:
        return tp_activation_elements(ctx)

    def make_buffers(self, ctx: Context, case: Case, *, seed: int, inplace: bool) -> Any:
        n = case.fields["count"]
        send = pattern(n, rank=self.group_index(case, ctx.rank), seed=seed, dtype=case.fields["dtype"],
                       device=ctx.device, summands=len(case.group_ranks))
        recv = send if inplace else send.clone()
        return {"send": send, "recv": recv, "seed": seed, "group": self.group(ctx, case)}

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch.distributed as dist
        if state["recv"] is not state["send"]:
            state["recv"].copy_(state["send"])
        dist.all_reduce(state["recv"], group=state["group"])

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        import torch
        n, dt = case.fields["count"], case.fields["dtype"]
        size = len(case.group_ranks)
        expected = torch.zeros(n, dtype=torch.float64, device=ctx.device)
        for r in range(size):  # exact: see pattern()
            expected += pattern(n, rank=r, seed=state["seed"], dtype=dt, device=ctx.device,
                                summands=size).double()
        return count_wrong(state["recv"], expected), n


if __name__ == "__main__":
    main_for(AllReduce())
