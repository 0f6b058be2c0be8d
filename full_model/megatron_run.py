"""Launch the real ``pretrain_gpt.py`` for a TrainConfig and judge the run from its log.

Why: the cross-check's measured side must be the framework the benchmark runs, at exactly
the configuration the probes measured. The Megatron flags come from the job script's one
table (:func:`full_model.jobscript.megatron_args`), the DeepSpeed JSON from
:func:`full_model.jobscript.deepspeed_config`; only what differs on a laptop is chosen here
(NullTokenizer data, gloo, the CPU workarounds, each with its upstream cause).

A run directory holds ``train.log`` (every rank's output), ``iterations.csv``/``.json``
(parsed), ``ds_config.json``, ``command.txt`` and ``manifest.json`` (config, framework
commit, library versions, environment, status). A run is ``failed`` (exit 1) when the
process failed, an iteration was skipped or had a NaN, a loss is missing or non-finite, or
fewer iterations than asked were logged: DeepSpeed's ZeRO step on gloo makes Megatron skip
every step *silently* (exit 0, no loss), so exit 0 alone proves nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from full_model.jobscript import JobOptions, deepspeed_config, megatron_args
from full_model.logparse import parse_log
from full_model.megatron_setup import SetupError, build_helpers, source_commit, synthetic_dataset
from microbench.config import TrainConfig

SCHEMA = "megatron-run/1"
LIBRARIES = ("torch", "deepspeed", "ezpz", "transformers", "mpi4py", "numpy")


@dataclass
class RunCheck:
    status: str
    """``ok`` or ``failed``."""
    reasons: list[str] = field(default_factory=list)
    num_iterations: int = 0


def check_iterations(it: pd.DataFrame, *, train_iters: int, returncode: int | None = 0) -> RunCheck:
    """Judge a run from its parsed iteration rows (one per iteration; duplicates from several
    ranks printing the same line are collapsed first)."""
    reasons = []
    if returncode not in (0, None):
        reasons.append(f"the launcher exited {returncode}")
    if len(it):
        it = it.drop_duplicates(subset=["iteration"], keep="last")
    n = len(it)
    if n < train_iters:
        reasons.append(f"{n} iteration line(s) logged, {train_iters} asked")
    if n:
        skipped = it["num_skipped_iterations"].fillna(0)
        if (skipped > 0).any():
            bad = it.loc[skipped > 0, "iteration"].astype(int).tolist()
            reasons.append(f"skipped iteration(s) {bad[:5]} (the optimizer step did not run)")
        nans = it["num_nan_iterations"].fillna(0)
        if (nans > 0).any():
            reasons.append(f"NaN iteration(s) {it.loc[nans > 0, 'iteration'].astype(int).tolist()[:5]}")
        loss = it["lm_loss"]
        missing = it.loc[loss.isna(), "iteration"].astype(int).tolist()
        if missing:
            reasons.append(f"no lm loss at iteration(s) {missing[:5]}")
        nonfinite = it.loc[loss.notna() & ~loss.map(lambda x: math.isfinite(float(x)) if pd.notna(x) else True),
                           "iteration"].astype(int).tolist()
        if nonfinite:
            reasons.append(f"non-finite lm loss at iteration(s) {nonfinite[:5]}")
    return RunCheck(status="failed" if reasons else "ok", reasons=reasons, num_iterations=n)


def _versions() -> dict[str, str | None]:
    from importlib import metadata
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def mpiexec_path() -> str | None:
    """mpich's mpiexec from this Python's environment (the ``local`` extra), else PATH's."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def launch_command(num_ranks: int, launcher: str, rank_cmd: list[str]) -> tuple[list[str] | None, str]:
    """The command for ``launcher`` (``mpiexec`` or ``spawn``); spawn returns None (we fork)."""
    if launcher == "mpiexec":
        mpiexec = mpiexec_path()
        if mpiexec is None:
            raise SetupError("--launcher mpiexec: no mpiexec (pip install 'llm-microbench[local]')")
        return [mpiexec, "-n", str(num_ranks), *rank_cmd], launcher
    return None, "spawn"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    source: Path
    out: Path
    train_iters: int = 10
    launcher: str = "auto"
    """``mpiexec`` (verified: ezpz takes its rank from MPI), ``spawn`` (local processes with
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set, torchrun-style), or ``auto`` (mpiexec if found)."""
    device: str = "cpu"
    """``cpu`` (DeepSpeed's CPU accelerator, gloo) or ``cuda`` (nccl)."""
    timeout_s: float = 1800.0
    timing_log_level: int = 2


def run(cfg: TrainConfig, opts: RunOptions) -> RunCheck:
    """Make data, write the DeepSpeed JSON, launch, parse, judge; writes the run directory."""
    m, p = cfg.model, cfg.parallel
    if opts.device == "cpu" and m.norm == "layernorm" and p.pp > 1:
        raise SetupError("norm=layernorm with pp>1 on CPU: GPTModelPipe passes sequence_parallel= to "
                         "torch.nn.LayerNorm (megatron/model/gpt_model.py) → TypeError; use an rmsnorm model")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    build_helpers(opts.source)
    data = synthetic_dataset(opts.source, vocab_size=m.vocab_size, seq_len=m.seq_len,
                             num_samples=opts.train_iters * p.global_batch)
    # DeepSpeed 0.18's wall-clock breakdown crashes its pipeline engine (vendor README).
    ds = deepspeed_config(cfg, wall_clock_breakdown=False)
    (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    backend = "gloo" if opts.device == "cpu" else "nccl"
    jo = JobOptions(nodes=1, ranks_per_node=p.world_size, train_script="pretrain_gpt.py",
                    train_iters=opts.train_iters, backend=backend,
                    tokenizer_args=("--tokenizer-type", "NullTokenizer", "--vocab-size", str(data.vocab_size_arg),
                                    "--make-vocab-size-divisible-by", "1"),
                    data_path=str(data.prefix), ds_config=str(out / "ds_config.json"),
                    timing_log_level=opts.timing_log_level,
                    extra_args=("--num-workers", "0", "--seed", "1234"))
    args = megatron_args(cfg, opts=jo)
    rank_cmd = [sys.executable, "-m", "full_model.megatron_rank", str(opts.source), "pretrain_gpt.py", *args]
    launcher = opts.launcher
    if launcher == "auto":
        launcher = "mpiexec" if mpiexec_path() else "spawn"
    cmd, launcher = launch_command(p.world_size, launcher, rank_cmd)
    n = p.world_size
    env = dict(os.environ, WANDB_MODE="disabled", NO_COLOR="1", LOCAL_SIZE=str(n), PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path(data.prefix).parents[2] / "torch_extensions")),
               PYTHONPATH=os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH")) if x))
    if opts.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # the probes' policy (microbench.runtime): the cores shared evenly by the local ranks
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    from microbench.runtime import free_port
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    shown = cmd or [f"RANK=0..{n - 1}", *rank_cmd]
    (out / "command.txt").write_text(shlex.join(shown) + "\n")
    t0 = time.time()
    log_path = out / "train.log"
    rc = _launch(cmd, rank_cmd, n=n, env=env, log_path=log_path, timeout_s=opts.timeout_s)
    res = parse_log(log_path)
    it = res.iterations
    check = check_iterations(it, train_iters=opts.train_iters, returncode=rc)
    if len(it):
        it = it.drop_duplicates(subset=["iteration"], keep="last")
    it.to_csv(out / "iterations.csv", index=False)
    (out / "iterations.json").write_text(json.dumps(res.to_json_obj()))
    manifest = {"schema": SCHEMA, "status": check.status, "reasons": check.reasons,
                "num_iterations": check.num_iterations, "train_iters": opts.train_iters,
                "command": shown, "launcher": launcher, "device": opts.device, "returncode": rc,
                "config": {"model": dataclasses.asdict(m), "parallel": dataclasses.asdict(p)},
                "framework": {"source": str(opts.source), "commit": source_commit(opts.source),
                              "entry": "pretrain_gpt.py"},
                "versions": _versions(), "dataset": str(data.prefix),
                "env": {k: env[k] for k in sorted(env) if k.split("_")[0] in
                        ("DS", "OMP", "LOCAL", "WANDB", "NCCL", "CCL", "CUDA", "MASTER")},
                "start": t0, "end": time.time()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return check


def _launch(cmd: list[str] | None, rank_cmd: list[str], *, n: int, env: dict, log_path: Path,
            timeout_s: float) -> int | None:
    """Run to completion with every rank's output in one log; a timeout kills the whole group."""
    with open(log_path, "w", encoding="utf-8") as log:
        if cmd is not None:
            procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)]
        else:
            procs = [subprocess.Popen(rank_cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=dict(env, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                               LOCAL_WORLD_SIZE=str(n))) for r in range(n)]
        deadline = time.monotonic() + timeout_s
        rcs: list[int | None] = []
        for proc in procs:
            try:
                rcs.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    _kill_group(q)
                log.write(f"\nfull_model.megatron: timed out after {timeout_s:.0f} s; killed\n")
                return 124
    return next((r for r in rcs if r), 0)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
