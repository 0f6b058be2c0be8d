"""Opt-in diagnostics of one real Megatron-DeepSpeed rank: where its step time goes.

    MICROBENCH_MDS_PROFILE=DIR python -m full_model.megatron run --model mds-cpu --tp 2 ...

Off unless ``MICROBENCH_MDS_PROFILE`` names a directory; then :mod:`full_model.megatron.rank`
calls :func:`install` before the framework starts, and every rank writes there (CSV/JSON,
never pickle):

* ``iterations-rank{R}.csv`` — each iteration (the pipeline engine's ``train_batch``; without
  it, from the first micro-batch's forward to the step at the accumulation boundary): its
  start and end on the host's monotonic clock (``time.perf_counter_ns``, one clock for every
  process of the host);
* ``collectives-rank{R}.csv`` — each ``torch.distributed`` collective the framework calls
  (Megatron's TP regions, DeepSpeed's engine): the iteration, the op, elements, dtype, group
  size, and the call's entry and exit on the same clock. Matching the k-th call of a group
  on every rank splits each call into the wait for the last rank to arrive (skew) and the
  transfer itself (from the last arrival to the exit);
* ``ops-rank{R}.csv`` — ``torch.profiler`` (CPU, shapes) over iteration
  ``MICROBENCH_MDS_PROFILE_ITER`` (default 4): per op and input shape, calls, self and total
  CPU µs;
* ``stacks-rank{R}.csv`` — the same iteration by the op's Python call stack (its innermost
  six frames, ``file(line): function`` joined by `` < ``): which framework code called each op
  whose self time over the iteration is at least 1 ms;
* ``meta-rank{R}.json`` — threads (``torch.get_num_threads``), ``OMP_NUM_THREADS``, pid.

The profiled iteration runs slower (the profiler's own cost); the others are only wrapped
by a clock read per collective.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import time
from pathlib import Path

ENV, ENV_ITER = "MICROBENCH_MDS_PROFILE", "MICROBENCH_MDS_PROFILE_ITER"
STACK_DEPTH, STACK_MIN_US = 6, 1000.0  # stacks-rank{R}.csv: the Python frames above each op costing ≥ 1 ms
WRAPPED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "reduce_scatter", "barrier", "send", "recv", "isend", "irecv")


def check_env(environ) -> None:
    """Before any rank starts: ``MICROBENCH_MDS_PROFILE_ITER`` is an iteration number ≥ 1, so a
    typo is one line (exit 2), not a rank that dies inside the framework."""
    v = environ.get(ENV_ITER)
    if environ.get(ENV) and v is not None and not (v.strip().isdigit() and int(v) >= 1):
        raise ValueError(f"environment variable {ENV_ITER}={v!r} is not an iteration number ≥ 1 "
                         "(the iteration to profile; unset it for 4)")
    where = environ.get(ENV)
    if where:  # every rank writes there: a directory that cannot be made ended each rank at start
        try:
            Path(where).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"environment variable {ENV}={where!r}: cannot make the directory "
                             f"({e.strerror or e})") from None
        if not os.access(where, os.W_OK):
            raise ValueError(f"environment variable {ENV}={where!r}: the directory is not writable")


class _State:
    iteration = 0
    rows: list[list] = []


def _group_size(dist, kw: dict, args: tuple) -> int:
    group = kw.get("group")
    try:
        return dist.get_world_size(group) if group is not None else dist.get_world_size()
    except Exception:  # noqa: BLE001 — a diagnostic never breaks the run
        return -1


def _wrap_collectives(dist) -> None:
    for name in WRAPPED:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def timed(*args, _fn=fn, _name=name, **kw):
            t = args[0] if args and hasattr(args[0], "numel") else kw.get("tensor")
            numel = t.numel() if hasattr(t, "numel") else -1
            dtype = str(t.dtype).replace("torch.", "") if hasattr(t, "dtype") else ""
            t0 = time.perf_counter_ns()
            out = _fn(*args, **kw)
            t1 = time.perf_counter_ns()
            _State.rows.append([_State.iteration, _name, numel, dtype, _group_size(dist, kw, args),
                                int(bool(kw.get("async_op"))), t0, t1])
            return out
        functools.update_wrapper(timed, fn)
        setattr(dist, name, timed)


def _write_ops(prof, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "input_shapes", "calls", "self_cpu_us", "cpu_total_us"])
        for e in prof.key_averages(group_by_input_shape=True):
            w.writerow([e.key, str(e.input_shapes), e.count, f"{e.self_cpu_time_total:.1f}",
                        f"{e.cpu_time_total:.1f}"])
    with open(path.with_name(path.name.replace("ops-", "stacks-")), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "stack", "calls", "self_cpu_us", "cpu_total_us"])
        for e in prof.key_averages(group_by_stack_n=STACK_DEPTH):
            if e.self_cpu_time_total >= STACK_MIN_US:
                w.writerow([e.key, " < ".join(e.stack), e.count, f"{e.self_cpu_time_total:.1f}",
                            f"{e.cpu_time_total:.1f}"])


def _python_frames(torch) -> dict:
    """torch 2.x records an op's Python frames only with the profiler's verbose experimental
    config (``with_stack`` alone leaves ``FunctionEvent.stack`` empty); without that private
    class the stacks file has no frames."""
    config = getattr(getattr(torch._C, "_profiler", None), "_ExperimentalConfig", None)
    return {"experimental_config": config(verbose=True)} if config is not None else {}


def install(out_dir: str, rank: int) -> None:
    """Wrap the collectives and the iteration of this rank: the pipeline engine's
    ``train_batch``, or without it the engine's micro-batches up to the boundary's ``step``.
    ``out_dir`` relative to where the rank starts."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe.engine import PipelineEngine
    # absolute now: the rank then changes into the framework's source, and a relative DIR
    # (as the README types it) written at the end of each iteration would name no directory
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    which = int(os.environ.get(ENV_ITER, "4"))
    _wrap_collectives(dist)
    its = out / f"iterations-rank{rank}.csv"
    its.write_text("iteration,start_ns,end_ns,profiled\n")
    coll = out / f"collectives-rank{rank}.csv"
    coll.write_text("iteration,op,elements,dtype,group_size,async,enter_ns,exit_ns\n")
    (out / f"meta-rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
         "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "profiled_iteration": which}))
    state = {"prof": None, "t0": 0, "open": False}  # open: a non-pipeline iteration has begun

    def begin() -> None:
        _State.iteration += 1
        state["t0"] = time.perf_counter_ns()
        if _State.iteration == which:
            from torch.profiler import ProfilerActivity, profile
            state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True,
                                    **_python_frames(torch))
            state["prof"].__enter__()

    def end() -> None:
        it, t1 = _State.iteration, time.perf_counter_ns()
        if state["prof"] is not None:
            state["prof"].__exit__(None, None, None)
        with open(its, "a") as f:
            f.write(f"{it},{state['t0']},{t1},{int(it == which)}\n")
        with open(coll, "a", newline="") as f:
            csv.writer(f).writerows(_State.rows)
        _State.rows.clear()
        if state["prof"] is not None:
            _write_ops(state["prof"], out / f"ops-rank{rank}.csv")
            state["prof"] = None

    train_batch = PipelineEngine.train_batch

    @functools.wraps(train_batch)
    def traced(self, *a, **k):
        begin()
        try:
            return train_batch(self, *a, **k)
        finally:
            end()
    PipelineEngine.train_batch = traced

    # Without the pipeline engine (ZeRO-2 runs with --no-pipeline-parallel) Megatron's
    # train_step calls the engine's forward/backward/step once per micro-batch: an iteration
    # begins at the first forward after a step at the accumulation boundary and ends there.
    from deepspeed.runtime.engine import DeepSpeedEngine
    forward, step = DeepSpeedEngine.forward, DeepSpeedEngine.step

    @functools.wraps(forward)
    def traced_forward(self, *a, **k):
        if not isinstance(self, PipelineEngine) and not state["open"]:
            state["open"] = True
            begin()
        return forward(self, *a, **k)

    @functools.wraps(step)
    def traced_step(self, *a, **k):
        boundary = not isinstance(self, PipelineEngine) and self.is_gradient_accumulation_boundary()
        res = step(self, *a, **k)
        if boundary and state["open"]:
            state["open"] = False
            end()
        return res
    DeepSpeedEngine.forward, DeepSpeedEngine.step = traced_forward, traced_step
