"""Parallelization of the reference step: TP collectives, pipeline p2p, DP gradient sync, AdamW.

* TP (Megatron-LM, Shoeybi et al. 2019): autograd functions for the conjugate pairs —
  identity forward / allreduce backward before a column-parallel linear, allreduce forward /
  identity backward after a row-parallel one; with sequence parallelism (Korthikanti et al.
  2022) allgather / reduce-scatter along the sequence dim instead. Vocab-parallel embedding
  reduction and vocab-parallel cross-entropy (max, sum-exp and target logit reduced over TP).
* PP: p2p over ``dist.batch_isend_irecv`` (send and receive of one schedule step posted
  together, as Megatron's ``_communicate``), timed as ``p2p_wait``.
* DP: gradients accumulate into one flat fp32 (``grad_dtype``) buffer through post-accumulate
  hooks (Megatron's ``main_grad``); the sync walks it in buckets — allreduce, or for ZeRO-1
  a reduce-scatter per bucket, AdamW on the rank's part of every bucket, allgather of the
  updated parameters (Megatron's distributed optimizer shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from microbench.model.grid import Grid
from microbench.runtime.world import World

# ---------------------------------------------------------------------------------------------
# Process groups


@dataclass
class Groups:
    """This rank's place in the grid and the groups it talks on (all created on every rank)."""

    grid: Grid
    rank: int
    tp_rank: int
    dp_rank: int
    stage: int
    tp_group: object
    dp_group: object
    tp_ranks: list[int]
    dp_ranks: list[int]
    prev_rank: int | None
    """Global rank of the previous pipeline stage's matching rank (None on the first stage)."""
    next_rank: int | None

    @classmethod
    def build(cls, world: World, grid: Grid) -> "Groups":
        _, tp_ranks, tp_group = world.groups_for(grid, "tp")
        _, dp_ranks, dp_group = world.groups_for(grid, "dp")
        world.groups_for(grid, "pp")  # created on every rank (p2p itself runs on the world group)
        c = grid.coords(world.rank)
        prev_rank = grid.rank_of(tp=c["tp"], dp=c["dp"], pp=c["pp"] - 1) if c["pp"] > 0 else None
        next_rank = grid.rank_of(tp=c["tp"], dp=c["dp"], pp=c["pp"] + 1) if c["pp"] < grid.pp - 1 else None
        return cls(grid=grid, rank=world.rank, tp_rank=c["tp"], dp_rank=c["dp"], stage=c["pp"],
                   tp_group=tp_group, dp_group=dp_group, tp_ranks=tp_ranks, dp_ranks=dp_ranks,
                   prev_rank=prev_rank, next_rank=next_rank)


# ---------------------------------------------------------------------------------------------
# TP autograd functions


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group`` (or MAX when wrapped in :class:`_Max`); returns the reduced tensor."""
    x = x.contiguous()
    if isinstance(group, _Max):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group.group)
    else:
        dist.all_reduce(x, group=group)
    return x


# torch ≥ 2.13 renames the tensor-in/tensor-out collectives; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Max:
    """Marks a group for a MAX reduction in :func:`_all_reduce` (keeps one helper)."""

    def __init__(self, group):
        self.group = group


def _gather_dim0(x: torch.Tensor, group, n: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group, n: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    """SP: allgather along s forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return _gather_dim0(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim0(g, ctx.group, ctx.n), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """SP: reduce-scatter along s forward, allgather backward."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return _reduce_scatter_dim0(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim0(g, ctx.group, ctx.n), None, None


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits [T, V/tp] (Megatron's vocab_parallel_cross_entropy)."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start):
        logits = logits - _all_reduce(logits.max(dim=-1).values, _Max(group)).unsqueeze(-1)
        local = labels - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        target = logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
        target = _all_reduce(target, group)
        exp = logits.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, inside)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, g):
        softmax, idx, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


class TPOps:
    """The collectives a layer calls (see ``full_model.reference.model.TPOps``); identity at tp 1."""

    def __init__(self, groups: Groups, *, sequence_parallel: bool, vocab_per_rank: int):
        self.tp = groups.grid.tp
        self.tp_rank = groups.tp_rank
        self.group = groups.tp_group
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.vocab_start = groups.tp_rank * vocab_per_rank

    def enter_column(self, x):
        if self.tp == 1:
            return x
        if self.sequence_parallel:
            return _GatherSeq.apply(x, self.group, self.tp)
        return _CopyToTP.apply(x, self.group)

    def exit_row(self, x):
        if self.tp == 1:
            return x
        if self.sequence_parallel:
            return _ReduceScatterSeq.apply(x, self.group, self.tp)
        return _ReduceFromTP.apply(x, self.group)

    vocab_reduce = exit_row  # the vocab-parallel embedding's partial sums reduce like a row linear

    def vocab_cross_entropy(self, logits, labels):
        if self.tp == 1:
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return _VocabParallelCE.apply(logits, labels, self.group, self.vocab_start)


# ---------------------------------------------------------------------------------------------
# Pipeline p2p


class P2P:
    """Activation/gradient exchange with the neighbouring stages; every call is one batch."""

    def __init__(self, groups: Groups, shape: tuple[int, ...], *, dtype: torch.dtype, device,
                 clock: Callable[[str], object]):
        self.prev, self.next = groups.prev_rank, groups.next_rank
        self.shape, self.dtype, self.device = shape, dtype, device
        self.clock = clock  # clock("p2p_wait") → context manager accumulating the phase time

    def _exchange(self, send_prev=None, send_next=None, recv_prev=False, recv_next=False):
        ops, got = [], {}
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev))
        if recv_prev:
            got["prev"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, got["prev"], self.prev))
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next))
        if recv_next:
            got["next"] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, got["next"], self.next))
        if ops:
            with self.clock("p2p_wait"):
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
        return got

    # Names follow Megatron's p2p_communication.
    def recv_forward(self):
        return self._exchange(recv_prev=self.prev is not None).get("prev")

    def send_forward(self, y):
        if self.next is not None:
            self._exchange(send_next=y)

    def recv_backward(self):
        return self._exchange(recv_next=self.next is not None).get("next")

    def send_backward(self, g):
        if self.prev is not None:
            self._exchange(send_prev=g)

    def send_forward_recv_backward(self, y):
        if self.next is None:
            return None
        return self._exchange(send_next=y, recv_next=True)["next"]

    def send_backward_recv_forward(self, g):
        if self.prev is None:
            return None
        return self._exchange(send_prev=g, recv_prev=True)["prev"]


# ---------------------------------------------------------------------------------------------
# DP gradient sync and AdamW over flat buffers


@dataclass(frozen=True)
class AdamW:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled decay (Loshchilov & Hutter 2019), on matrices only (not norms), as Megatron."""


class FlatOptimizer:
    """Parameters in one flat buffer, gradients in another (``grad_dtype``), AdamW on top.

    ZeRO-0: bucketed allreduce of the whole gradient, AdamW on everything. ZeRO-1: each
    bucket is reduce-scattered, the rank updates its 1/dp of every bucket (fp32 master, m, v
    held only for that part), and the bucket's parameters are allgathered back.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], groups: Groups, *,
                 zero_stage: int, grad_dtype: torch.dtype, bucket_numel: int, adam: AdamW,
                 sp_params: set[str] = frozenset(), tp_replicated_sync: bool = False):
        self.groups, self.adam, self.zero = groups, adam, zero_stage
        self.dp = groups.grid.dp
        params = [p for _, p in named_params]
        dev, dtype = params[0].device, params[0].dtype
        n = sum(p.numel() for p in params)
        total = math.ceil(n / self.dp) * self.dp
        self.numel = n
        self.param_buf = torch.zeros(total, dtype=dtype, device=dev)
        self.grad_buf = torch.zeros(total, dtype=grad_dtype, device=dev)
        self.decay_mask = torch.zeros(total, dtype=torch.float32, device=dev)
        self.sp_views: list[torch.Tensor] = []
        off = 0
        for name, p in named_params:
            k = p.numel()
            self.param_buf[off:off + k].copy_(p.detach().reshape(-1))
            p.data = self.param_buf[off:off + k].view_as(p)
            main_grad = self.grad_buf[off:off + k].view_as(p)
            p.register_post_accumulate_grad_hook(_accumulate_into(main_grad))
            if p.dim() >= 2:
                self.decay_mask[off:off + k] = 1.0
            if name in sp_params:
                self.sp_views.append(main_grad)
            off += k
        # Buckets: multiples of dp so every rank owns an equal contiguous part of each.
        b = max(self.dp, (bucket_numel // self.dp) * self.dp)
        self.buckets = [(s, min(s + b, total)) for s in range(0, total, b)]
        self.owned = [self._owned(s, e) for s, e in self.buckets] if zero_stage >= 1 else \
            list(self.buckets)
        # The rank's owned ranges as fp32 master leaves for torch's fused AdamW (one pass over
        # p, m, v, g — what Megatron/DeepSpeed's fused Adam does, and what the layer_ops
        # probe measures). Decoupled decay is masked to matrices, so it is applied here and
        # the optimizer's own weight_decay stays 0.
        self.master = [self.param_buf[s:e].detach().float().clone().requires_grad_(True)
                       for s, e in self.owned]
        kw = dict(lr=adam.lr, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=0.0)
        try:
            self.opt = torch.optim.AdamW(self.master, fused=True, **kw)
        except RuntimeError:  # no fused kernel for this device
            self.opt = torch.optim.AdamW(self.master, foreach=True, **kw)

    def _owned(self, s: int, e: int) -> tuple[int, int]:
        part = (e - s) // self.dp
        r = self.groups.dp_rank
        return s + r * part, s + (r + 1) * part

    def zero_grad(self) -> None:
        self.grad_buf.zero_()

    def sync_grads(self) -> None:
        """SP norm-weight reduction over TP, then the DP reduction (bucketed)."""
        for g in self.sp_views:  # each TP rank saw only its sequence shard
            dist.all_reduce(g, group=self.groups.tp_group)
        if self.dp == 1:
            return
        for (s, e), (os_, oe) in zip(self.buckets, self.owned):
            bucket = self.grad_buf[s:e]
            if self.zero >= 1:
                out = torch.empty(oe - os_, dtype=bucket.dtype, device=bucket.device)
                _reduce_scatter_single(out, bucket, group=self.groups.dp_group)
                self.grad_buf[os_:oe].copy_(out)
            else:
                dist.all_reduce(bucket, group=self.groups.dp_group)
        for os_, oe in self.owned:
            self.grad_buf[os_:oe].div_(self.dp)

    def step(self) -> None:
        """AdamW on the owned parts (a.k.a. all of it at ZeRO-0), then the model-dtype copy."""
        decay = self.adam.lr * self.adam.weight_decay
        with torch.no_grad():
            for part, (s, e) in zip(self.master, self.owned):
                g = self.grad_buf[s:e]
                part.grad = g if g.dtype == torch.float32 else g.float()
                part.mul_(1 - decay * self.decay_mask[s:e])
        self.opt.step()
        with torch.no_grad():
            for part, (s, e) in zip(self.master, self.owned):
                self.param_buf[s:e].copy_(part)

    def gather_params(self) -> None:
        """ZeRO-1: every rank gets the parameters the others updated."""
        if self.zero < 1 or self.dp == 1:
            return
        for (s, e), (os_, oe) in zip(self.buckets, self.owned):
            _all_gather_single(self.param_buf[s:e], self.param_buf[os_:oe].clone(),
                                        group=self.groups.dp_group)


def _accumulate_into(main_grad: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        main_grad.add_(p.grad)
        p.grad = None
    return hook
