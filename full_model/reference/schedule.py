"""The 1F1B pipeline schedule (PipeDream-Flush; Narayanan et al. 2021, §2.2).

Stage ``r`` of ``p`` runs min(p − r − 1, m) warm-up forwards, then alternates one forward and
one backward until every micro-batch has gone forward, then drains the remaining backwards.
At most p − r micro-batches are in flight on stage r. With p = 1 it is plain gradient
accumulation. Send and receive of one step go out as one batch (see ``parallel.P2P``).

The schedule knows nothing of the model: ``forward(i, x) → y`` runs micro-batch ``i`` on this
stage (``x`` is the received activation, None on the first stage; ``y`` is the loss on the
last), and ``backward(y, grad) → grad_x`` runs its backward (``grad`` None on the last stage).
"""
from __future__ import annotations

from typing import Callable

import torch

from full_model.reference.parallel import P2P

Forward = Callable[[int, "torch.Tensor | None"], torch.Tensor]
Backward = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], "torch.Tensor | None"]


def one_f_one_b(*, num_microbatches: int, stage: int, num_stages: int, p2p: P2P,
                forward: Forward, backward: Backward) -> list[torch.Tensor]:
    """Run one step's micro-batches; returns the last stage's losses (empty elsewhere)."""
    m = num_microbatches
    warmup = min(num_stages - stage - 1, m)
    steady = m - warmup
    last = stage == num_stages - 1
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []

    def run_forward(i: int, x: torch.Tensor | None) -> torch.Tensor:
        if x is not None:
            x.requires_grad_(True)
        y = forward(i, x)
        inputs.append(x)
        outputs.append(y)
        if last:
            losses.append(y.detach())
        return y

    def run_backward(grad: torch.Tensor | None) -> torch.Tensor | None:
        x, y = inputs.pop(0), outputs.pop(0)
        return backward(y, grad, x)

    for i in range(warmup):
        y = run_forward(i, p2p.recv_forward())
        p2p.send_forward(y.detach())

    x = p2p.recv_forward() if steady > 0 else None
    for j in range(steady):
        i = warmup + j
        y = run_forward(i, x)
        grad = p2p.send_forward_recv_backward(y.detach()) if not last else None
        gx = run_backward(grad)
        if j == steady - 1:
            x = None
            p2p.send_backward(gx)
        else:
            x = p2p.send_backward_recv_forward(gx)  # None on the first stage

    for _ in range(warmup):
        gx = run_backward(p2p.recv_backward())
        p2p.send_backward(gx)
    assert not inputs and not outputs, "1F1B left micro-batches in flight"
    return losses
