"""Fault injection for the tests, read from ``MICROBENCH_FAULT`` (a malformed value is a usage
error before the first case):

* ``R:N[:hang]`` — rank R dies (exit 17) or hangs before its case N: a dead and a hung rank;
* ``corrupt:R:scale=F|nan|zero`` — after rank R's checked call (fresh data) and before its
  check, every result tensor the probe names (:meth:`Probe.result`) is scaled by F, gets a NaN
  in its first element, or is zeroed: every check is shown catching a wrong result end to end.
"""
from __future__ import annotations

import os
from typing import Callable

from microbench.runtime.errors import UsageError


def fault_plan(rank: int) -> tuple[int, str] | None:
    """``MICROBENCH_FAULT=R:N[:hang]`` makes rank R die (or hang) before its case N: the tests
    of a dead and of a hung rank. (``corrupt:…`` is :func:`corruption`'s.)"""
    spec = os.environ.get("MICROBENCH_FAULT")
    if not spec:
        return None
    if spec.startswith("corrupt:"):
        corruption(rank)  # a malformed spec is a usage error before the first case
        return None
    try:
        who, when, *how = spec.split(":")
        fault = (int(when or 0), how[0] if how else "die")
        if fault[1] not in ("die", "hang") or len(how) > 1:
            raise ValueError
        return fault if int(who) == rank else None
    except ValueError:
        raise UsageError(f"MICROBENCH_FAULT={spec!r}: expected R:N[:hang] or "
                         "corrupt:R:scale=F|nan|zero") from None


def corruption(rank: int) -> Callable[[list], None] | None:
    """``MICROBENCH_FAULT=corrupt:R:scale=F|nan|zero``: after rank R's checked call (fresh
    data) and before its check, every result tensor the probe names (:meth:`Probe.result`)
    is scaled by F, gets a NaN in its first element, or is zeroed — so each check is shown
    catching a wrong result end to end. None on every other rank or without the variable."""
    spec = os.environ.get("MICROBENCH_FAULT", "")
    if not spec.startswith("corrupt:"):
        return None
    _, who, how = (spec.split(":", 2) + ["", ""])[:3]
    mode, _, value = how.partition("=")
    try:
        target = int(who)
        factor = float(value) if mode == "scale" else None
        if mode not in ("scale", "nan", "zero") or (mode != "scale" and value):
            raise ValueError
    except ValueError:
        raise UsageError(f"MICROBENCH_FAULT={spec!r}: expected corrupt:R:scale=F, corrupt:R:nan "
                         "or corrupt:R:zero") from None
    if target != rank:
        return None

    def corrupt(tensors: list) -> None:
        import torch
        with torch.no_grad():
            for t in tensors:
                if t.numel() == 0:
                    continue
                if mode == "scale":
                    t.mul_(factor)
                elif mode == "zero":
                    t.zero_()
                else:
                    t[(0,) * t.dim()] = float("nan")
    return corrupt
