"""The run's lifecycle: its manifest, and the one way a rank gives up.

Split from the harness so that what a run leaves on disk when it ends — well or badly — can
be read in one place.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, Sequence

from . import results
from .runtime import World

if TYPE_CHECKING:
    from .harness import Context, Probe


def build_manifest(probe: Probe, ctx: Context, argv: Sequence[str]) -> dict[str, Any]:
    w = ctx.world
    man = {"probe": probe.name, "command": [sys.executable, "-m", probe.module, *argv],
           "world_size": w.world_size, "hostnames": w.hostnames, "num_nodes": w.num_nodes,
           "ranks_per_node": w.ranks_per_node, "device": w.device_kind,
           "device_name": device_name(w), "backend": w.backend, "launcher": w.launcher,
           "timeout_s": w.timeout_s, "grid": {"tp": ctx.grid.tp, "pp": ctx.grid.pp, "dp": ctx.grid.dp},
           "versions": results.library_versions(), "model": ctx.args.model}
    if ctx.cfg is not None:
        import dataclasses
        man["config"] = {"model": dataclasses.asdict(ctx.cfg.model),
                         "parallel": dataclasses.asdict(ctx.cfg.parallel)}
    man.update(probe.manifest(ctx))
    return man


def device_name(world: World) -> str:
    import platform
    if world.device_kind == "cpu":
        return platform.processor() or platform.machine()
    module = __import__("torch").__dict__[world.device_kind]
    try:
        return module.get_device_name(world.device)
    except Exception:
        return world.device_kind


def fail_fast(module: str, ctx: Context, case: str, exc: BaseException) -> None:
    """Name the rank, host, probe and case, keep the rows, and exit without waiting on peers."""
    abort_rank(module, ctx.world, ctx.writer, f"case {case}", exc,
               row={"probe": module.rsplit(".", 1)[-1], "case": case})


def abort_rank(module: str, world: World, writer: results.RunWriter | None, what: str,
               exc: BaseException, *, row: dict[str, Any]) -> None:
    """The one way a rank gives up: a line naming module, rank, host and what failed, a
    'failed' row after the rows already written, then exit (a collective may be stuck:
    never wait on a destroy that can hang)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    msg = (f"error: {module}: rank {world.rank} on {world.hostname}: {what} failed: "
           f"{type(exc).__name__}: {text} (a peer may have died or hung; group timeout "
           f"{world.timeout_s:g} s)")
    print(msg, file=sys.stderr, flush=True)
    if os.environ.get("MICROBENCH_DEBUG"):
        traceback.print_exc()
    if writer is not None:
        writer.write_row({**row, "status": "failed", "reason": msg})
        writer.close(status="failed")
    sys.stdout.flush()
    os._exit(1)
