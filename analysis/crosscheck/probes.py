"""The probes a cross-check runs at a training run's exact shapes and rank count, and the
commands it starts (each bounded, its output kept in a log beside the run directory)."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from microbench.harness.lifecycle import end_child, interrupt_name
from microbench.harness.modelargs import DIM_FLAGS
from microbench.harness.registry import COMPUTE
from microbench.model.config import PRESETS, TrainConfig, preset
from microbench.model.workload import Collective, workload

from analysis.crosscheck import CrossCheckError

PROBES = COMPUTE
"""The compute probes, measured again next to each framework run (their speed drifts)."""


def parse_layout(text: str) -> dict[str, int]:
    """'tp2' → {tp: 2}; 'tp2pp2' or 'tp2xpp2' → {tp: 2, pp: 2}."""
    parts = re.findall(r"(tp|pp|dp)(\d+)", text)
    if not parts or re.sub(r"(tp|pp|dp)\d+|[x×_-]", "", text):
        raise CrossCheckError(f"--layouts: {text!r} is not a layout like tp2, pp2, dp2 or tp2pp2")
    return {k: int(v) for k, v in parts}


def complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run whose manifest says ``ok``."""
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def run_command(cmd: list[str], *, timeout: float, log: Path, deadline: float | None = None,
                reuse: bool = False) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` for at most ``timeout`` s (and not past ``deadline``, a ``time.monotonic()``
    instant, where given); its output goes to ``log``, also when it runs out of time (then
    ``subprocess.TimeoutExpired`` is raised as usual). A non-zero exit is a CrossCheckError.
    ``reuse``: a command whose run directory (``log`` without its suffix) is already
    :func:`complete` is not run again (None)."""
    if reuse and complete(log.with_suffix("")):
        return None
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise subprocess.TimeoutExpired(cmd, 0)
    t0 = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        out, err = _rest(proc)
        log.write_text(f"$ {' '.join(cmd)}\n# killed after {timeout:.1f} s\n{out}\n--- stderr ---\n{err}")
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from e
    except BaseException as e:  # Ctrl-C, SIGTERM under raise_on_terminate, or any error here: the child goes too
        end_child(proc)
        out, err = _rest(proc)
        why = f"interrupted by {interrupt_name(e)}" if isinstance(e, KeyboardInterrupt) else \
            f"stopped by {type(e).__name__}: {e}"
        log.write_text(f"$ {' '.join(cmd)}\n# {why} after {time.monotonic() - t0:.1f} s; the command was ended "
                       f"(exit {proc.returncode})\n{out}\n--- stderr ---\n{err}")
        raise
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    log.write_text(f"$ {' '.join(cmd)}\n# {time.monotonic() - t0:.1f} s, exit {res.returncode}\n"
                   f"{res.stdout}\n--- stderr ---\n{res.stderr}")
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise CrossCheckError(f"{' '.join(cmd[2:5])} failed (exit {res.returncode}): {tail}; log {log}")
    return res


def _rest(proc: subprocess.Popen) -> tuple[str, str]:
    """What an ended command wrote; bounded, since a grandchild (an embedded world's rank) may
    keep the pipes open a while longer."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired as e:
        return tuple(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))


def ran_past(e: subprocess.TimeoutExpired) -> str:
    """One line for a command :func:`run_command` stopped at its limit (its log says the rest)."""
    what = e.cmd[2] if len(e.cmd) > 2 and e.cmd[1] == "-m" else " ".join(map(str, e.cmd[:1]))
    return f"{what} ran past its limit of {e.timeout:.0f} s and was killed"


def probe_flags(cfg: TrainConfig) -> list[str]:
    """The probes' flags for exactly ``cfg``: its preset, every dimension that differs from the
    preset's, the layout and the schedule (``--recompute``, ``--sequence-parallel``). A model
    the flags cannot state (another dtype, norm or MLP than its preset's) is refused."""
    m, p = cfg.model, cfg.parallel
    if m.name not in PRESETS:
        raise CrossCheckError(f"model {m.name!r}: the probes take a preset ({', '.join(PRESETS)}) with "
                              "dimension overrides; add the model to microbench/model/config.py")
    base = preset(m.name).model
    dims = {field: getattr(m, field) for field in DIM_FLAGS.values()}
    other = [f.name for f in dataclasses.fields(m) if f.name not in dims and getattr(m, f.name) != getattr(base, f.name)]
    if other:
        raise CrossCheckError(f"model {m.name!r} differs from its preset in {', '.join(other)}: the probes' flags "
                              "state only dimensions; add a preset with those fields")
    flags = ["--model", m.name]
    for flag, field in DIM_FLAGS.items():
        if dims[field] != getattr(base, field):
            flags += [f"--{flag}", str(dims[field])]
    flags += ["--tp", str(p.tp), "--pp", str(p.pp), "--dp", str(p.dp), "--mbs", str(p.micro_batch),
              "--recompute", p.recompute]
    return flags + (["--sequence-parallel"] if p.sequence_parallel else []) + \
        (["--zero", str(p.zero_stage)] if p.zero_stage else [])


SWEPT = ("allreduce", "allgather", "reduce_scatter")
"""The collective kinds a cross-check sweeps over the world, where the step has them."""


def collective_kinds(cfg: TrainConfig) -> tuple[str, ...]:
    """The collective kinds the step's workload prices (TP, the stages' extras, the DP sync):
    each is swept over the run's world, so none is priced from another kind or a spec."""
    w = workload(cfg)
    ops = (*w.collectives, *w.first, *w.last, *w.step)
    have = {op.kind for op in ops if isinstance(op, Collective)}
    return tuple(k for k in SWEPT if k in have)


def measure_probes(cfg: TrainConfig, *, text: str, out: Path, done: dict[tuple, list[Path]], timeout: float,
                   compute_iters: tuple[int, int] | None = None, compute_only: bool = False,
                   deadline: float | None = None, extra: Sequence[str] = (), reuse: bool = False,
                   adam: str = "fused") -> list[Path]:
    """The probes at a run's exact shapes and rank count (so the cores are as busy as in the
    step): the compute probes, a size sweep of every collective kind the step has, the
    pipeline send/recv at the step's shape. ``done`` caches run directories across layouts
    and configurations that share them. ``compute_iters`` = (iterations, warm-up) of the
    compute probes (default: theirs); ``compute_only``: the compute probes alone; ``deadline``:
    no command runs past it (see :func:`run_command`); ``extra``: flags every probe gets
    (``--device cuda``, ``--timeout-s``); ``reuse``: a complete run directory is kept, not measured again;
    ``adam``: the optimizer implementation the measured step runs (``microbench.layer_ops --adam``)."""
    p = cfg.parallel
    flags, world = [*probe_flags(cfg), *extra], p.world_size
    dirs: list[Path] = []
    its = ["-n", str(compute_iters[0]), "-w", str(compute_iters[1])] if compute_iters else []

    def measure(d: Path, *argv: str) -> None:
        run_command([sys.executable, "-m", *argv, "--out", str(d)], timeout=timeout, log=d.with_suffix(".log"),
                    deadline=deadline, reuse=reuse)

    for probe in PROBES:
        own = ["--adam", adam] if probe == "layer_ops" and adam != "fused" else []
        key = (probe, world, *flags, *own)  # the shapes, and contention on the rank count
        if key not in done:
            d = out / "probes" / f"{probe}-{text}"
            measure(d, f"microbench.{probe}", *flags, *own, *its, "--ranks", str(world), "--quiet")
            done[key] = [d]
        dirs += done[key]
    for coll in () if compute_only or world == 1 else collective_kinds(cfg):
        key = (coll, world)  # a size sweep over the world: TP activations and DP buckets alike
        if key not in done:
            d = out / "probes" / f"{coll}-w{world}-{text}"  # the configuration that measured it first
            if reuse and not complete(d):  # made by whichever configuration came first then
                d = next((x for x in sorted(d.parent.glob(f"{coll}-w{world}-*")) if complete(x)), d)
            # many iterations: the profile prices by the mean, and a small collective's
            # latency on a shared host is heavy-tailed (the mean of 20 samples wanders)
            measure(d, f"microbench.{coll}", "-b", "4K", "-e", "16M", "-f", "4", "-n", "100", "-w", "10",
                    "--ranks", str(world), *extra, "--quiet")
            done[key] = [d]
        dirs += done[key]
    if p.tp > 1 and not p.sequence_parallel and not compute_only:
        # what a TP allreduce costs inside the step (microbench.tp_sync; SP's calls are not its)
        key = ("tp_sync", world, *flags)
        if key not in done:
            d = out / "probes" / f"tp_sync-{text}"
            measure(d, "microbench.tp_sync", *flags, *its, "--ranks", str(world), "--quiet")
            done[key] = [d]
        dirs += done[key]
    if p.pp > 1 and not compute_only:  # the pipeline activation/gradient at the step's shape
        key = ("sendrecv", world, *flags)
        if key not in done:
            d = out / "probes" / f"sendrecv-{text}"
            measure(d, "microbench.sendrecv", *flags, "--ranks", str(world), "--quiet")
            done[key] = [d]
        dirs += done[key]
    return dirs


def require_system(cmd: str, system: str | None) -> None:
    """Before any run: what no probe measures is specified by a named spec, never invented."""
    if system is None:
        raise CrossCheckError(f"{cmd}: give --system NAME, the spec that prices what the probes do not "
                              "measure (the network between nodes, device memory, overlap)")
