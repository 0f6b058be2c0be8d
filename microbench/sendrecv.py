"""Pipeline p2p probe: every pair of adjacent stages of the --tp/--pp/--dp grid at once.

    mpiexec -n 4 python -m microbench.sendrecv --model alcf-1t --tp 2 --pp 2
    mpiexec -n 2 python -m microbench.sendrecv --pp 2 -b 1K -e 64M -f 4 --mode 1f1b

Modes: ``oneway`` — stage s sends its [mbs·s, d] activation to s+1 (the forward pass);
``1f1b`` — the steady state of 1F1B: on every link the activation goes forward while the
gradient comes back (Megatron's send_forward_recv_backward / send_backward_recv_forward),
posted together with ``batch_isend_irecv``. First and last stages have one side only.
S is one message (÷ tp with --scatter-gather or sequence parallelism); algbw = busbw =
S/t per direction (nccl-tests' send/recv factor 1); pair_gbps counts both directions.
Bounded by the link between the two stages (a node boundary when PP crosses nodes) for
large S, by latency for small S. With pp > 2 a middle stage drives two links at once.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

from microbench.harness.collective import add_size_args, count_wrong, pattern, sweep_sizes, validate_sizes
from microbench.model.config import dtype_bytes
from microbench.harness.contract import Case, Context, Probe
from microbench.harness.engine import main_for
from microbench.harness.options import torch_dtype
from microbench.runtime.errors import UsageError
from microbench.model.workload import workload

GRAD_SEED = 5  # the gradient's fill differs from the activation's


class SendRecv(Probe):
    name = "sendrecv"
    module = "microbench.sendrecv"
    description = __doc__.splitlines()[0]
    footer_metric = "busbw_gbps"
    columns = (("size", "size_bytes", ">12d"), ("count", "count", ">11d"), ("type", "dtype", ">5"),
               ("mode", "mode", ">6"), ("pairs", "num_groups", ">5d"), ("link", "link", ">5"),
               ("time(us)", "time_us", ">10.1f"), ("algbw(GB/s)", "algbw_gbps", ">11.3f"),
               ("busbw(GB/s)", "busbw_gbps", ">11.3f"), ("pair(GB/s)", "pair_gbps", ">10.3f"),
               ("#wrong", "num_wrong", ">6d"))

    def add_args(self, p: argparse.ArgumentParser) -> None:
        add_size_args(p)
        p.add_argument("--mode", default="both", choices=("oneway", "1f1b", "both"),
                       help="forward activation only, 1F1B both directions, or both modes")
        p.add_argument("--groups", default="all", choices=("all", "one"),
                       help="every stage pair at once (as in a step), or one pair with the rest idle")
        p.add_argument("--scatter-gather", action="store_true",
                       help="send 1/tp of the activation per rank (Megatron scatter-gather; implied by SP)")

    def validate(self, args: argparse.Namespace) -> None:
        validate_sizes(args)
        if (args.pp or 1) < 2:
            raise UsageError(f"--pp {args.pp or 1}: sendrecv pairs adjacent pipeline stages, give "
                             "--pp ≥ 2 (e.g. --pp 2 on 2 ranks)")

    def cases(self, ctx: Context) -> Iterable[Case]:
        args, grid, world = ctx.args, ctx.grid, ctx.world
        pipes, mine, group = world.groups_for(grid, "pp")  # sorted: rank order is stage order
        links = [(p[s], p[s + 1]) for p in pipes for s in range(len(p) - 1)]
        active = links if args.groups == "all" else links[:1]
        import torch.distributed as dist
        dist.barrier(group=group)  # every rank initialises its pipeline's communicator
        nxt = [b for a, b in active if a == ctx.rank]
        prv = [a for a, b in active if b == ctx.rank]
        ctx.extra["links"] = {"next": nxt, "prev": prv, "group": group}  # this rank's side
        crossing = [list(link) for link in active if world.crosses_nodes(link)]
        if ctx.cfg is not None:
            act = next(c for c in workload(ctx.cfg, p2p_scatter_gather=args.scatter_gather).p2p
                       if c.name == "pp_activation")
            sizes, dtype = [act.elements], act.dtype
        else:
            dtype = args.dtype
            sizes = sorted({max(1, b // dtype_bytes(dtype)) for b in sweep_sizes(args)})
        modes = ("oneway", "1f1b") if args.mode == "both" else (args.mode,)
        for count in sizes:
            for mode in modes:
                op = self.name if ctx.cfg is None else \
                    "pp_activation" if mode == "oneway" else "pp_activation+pp_gradient"
                size = count * dtype_bytes(dtype)
                fields = {"kind": "sendrecv", "op": op, "mode": mode, "count": count,
                          "size_bytes": size, "bytes_per_pair": size * (1 if mode == "oneway" else 2),
                          "dtype": dtype, "axis": "pp", "group_size": 2, "num_groups": len(active),
                          "ranks_per_node": world.ranks_per_node, "crosses_nodes": bool(crossing),
                          "num_pairs_crossing": len(crossing),
                          "link": "inter" if len(crossing) == len(active) else "mixed" if crossing else "intra", "pairs": [list(link) for link in active],
                          "scatter_gather": args.scatter_gather}
                yield Case(f"{op}-{size}-{mode}", fields, group_ranks=mine, active=bool(nxt or prv))

    def setup(self, ctx: Context, case: Case, *, seed: int) -> Any:
        import torch
        f = case.fields
        n, dt, both = f["count"], f["dtype"], f["mode"] == "1f1b"
        mk = lambda s: pattern(n, rank=ctx.rank, seed=s, dtype=dt, device=ctx.device)
        empty = lambda: torch.empty(n, dtype=torch_dtype(dt), device=ctx.device)
        import torch.distributed as dist
        links = ctx.extra["links"]
        st = {"seed": seed, "ops": [], "group": links["group"]}
        for peer in links["next"]:
            st["act_out"] = mk(seed)
            st["ops"].append((dist.isend, st["act_out"], peer))
            if both:
                st["grad_in"], st["grad_from"] = empty(), peer
                st["ops"].append((dist.irecv, st["grad_in"], peer))
        for peer in links["prev"]:
            st["act_in"], st["act_from"] = empty(), peer
            st["ops"].append((dist.irecv, st["act_in"], peer))
            if both:
                st["grad_out"] = mk(seed + GRAD_SEED)
                st["ops"].append((dist.isend, st["grad_out"], peer))
        return st

    def run(self, ctx: Context, case: Case, state: Any) -> None:
        import torch.distributed as dist
        ops = [dist.P2POp(fn, t, peer, group=state["group"]) for fn, t, peer in state["ops"]]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def check(self, ctx: Context, case: Case, state: Any) -> tuple[int, int]:
        wrong = checked = 0
        n, dt = case.fields["count"], case.fields["dtype"]
        for buf, src, seed in (("act_in", "act_from", state["seed"]),
                               ("grad_in", "grad_from", state["seed"] + GRAD_SEED)):
            if buf in state:
                want = pattern(n, rank=state[src], seed=seed, dtype=dt, device=ctx.device)
                wrong += count_wrong(state[buf], want)
                checked += n
        return wrong, checked

    def result(self, ctx: Context, case: Case, state: Any) -> list:
        """The received buffers the check reads (MICROBENCH_FAULT=corrupt edits them)."""
        return [state[b] for b in ("act_in", "grad_in") if b in state]

    def metrics(self, ctx: Context, case: Case, time_s: float) -> dict[str, Any]:
        if time_s <= 0:
            return {}
        algbw = case.fields["size_bytes"] / time_s / 1e9
        return {"algbw_gbps": algbw, "busbw_gbps": algbw, "busbw_factor": 1.0,
                "pair_gbps": case.fields["bytes_per_pair"] / time_s / 1e9}


if __name__ == "__main__":
    main_for(SendRecv())
