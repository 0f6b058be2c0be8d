"""Launch the real ``pretrain_gpt.py`` for a TrainConfig and judge the run from its log.

Why: the cross-check's measured side must be the framework the benchmark runs, at exactly
the configuration the probes measured. The Megatron flags come from the job script's one
table (:func:`full_model.megatron.jobscript.megatron_args`), the DeepSpeed JSON from
:func:`full_model.megatron.jobscript.deepspeed_config`; only what differs on a laptop is chosen here
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
import io
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

from full_model.megatron.jobscript import JobOptions, deepspeed_config, megatron_args
from full_model.megatron.logparse import ParseResult, parse_log
from full_model.megatron.setup import Dataset, SetupError, build_helpers, framework_identity, synthetic_dataset
from microbench.harness.lifecycle import interrupt_name
from microbench.model.config import TrainConfig
from microbench.runtime import launch as rendezvous
from microbench.runtime.spawn import term_with_parent

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


def refuse_unrunnable(cfg: TrainConfig, device: str = "cpu") -> None:
    """SetupError for a configuration this Megatron-DeepSpeed cannot run (before any launch)."""
    m, p = cfg.model, cfg.parallel
    if device == "cpu" and m.norm == "layernorm" and p.pp > 1:
        raise SetupError("norm=layernorm with pp>1 on CPU: GPTModelPipe passes sequence_parallel= to "
                         "torch.nn.LayerNorm (megatron/model/gpt_model.py) → TypeError; use an rmsnorm model")
    if p.zero_stage >= 2 and p.pp > 1:
        raise SetupError(f"zero stage {p.zero_stage} with pp {p.pp}: DeepSpeed's pipeline engine refuses ZeRO-2/3 "
                         "(\"incompatible with pipeline parallelism\"); use pp 1 or ZeRO-1")
    if p.sequence_parallel and p.tp == 1:
        raise SetupError("sequence parallelism with tp 1: Megatron turns it off (arguments.py); use tp > 1")


def run(cfg: TrainConfig, opts: RunOptions) -> RunCheck:
    """Make data, write the DeepSpeed JSON, launch, parse, judge; writes the run directory."""
    m, p = cfg.model, cfg.parallel
    refuse_unrunnable(cfg, opts.device)
    # every path handed to a rank is absolute: ranks start inside the checkout (megatron_rank)
    out, source = Path(os.path.abspath(opts.out)), Path(os.path.abspath(opts.source))
    out.mkdir(parents=True, exist_ok=True)
    build_helpers(source)
    data = synthetic_dataset(source, vocab_size=m.vocab_size, seq_len=m.seq_len,
                             num_samples=opts.train_iters * p.global_batch)
    # DeepSpeed 0.18's wall-clock breakdown crashes its pipeline engine (vendor README).
    ds = deepspeed_config(cfg, wall_clock_breakdown=False)
    (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    args = megatron_args(cfg, opts=_job_options(cfg, opts, data=data, ds_config=out / "ds_config.json"))
    rank_cmd = [sys.executable, "-m", "full_model.megatron.rank", str(source), "pretrain_gpt.py", *args]
    launcher = opts.launcher
    if launcher == "auto":
        launcher = "mpiexec" if mpiexec_path() else "spawn"
    cmd, launcher = launch_command(p.world_size, launcher, rank_cmd)
    env = _rank_env(p.world_size, device=opts.device, data=data)
    # the ranks' temporary files (wandb makes two directories at import and a rank ended by
    # the launcher never removes them: 784 were left in /tmp by one grid) go with the run
    rank_tmp = out / "tmp"
    rank_tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(rank_tmp)
    shown = cmd or [f"RANK=0..{p.world_size - 1}", *rank_cmd]
    (out / "command.txt").write_text(shlex.join(shown) + "\n")
    t0 = time.time()
    log_path = out / "train.log"
    left = opts.timeout_s
    rc, removed, relaunched = None, [], None
    try:
        if opts.device == "cpu":
            left -= prebuild_cpu_ops(env, log_path=out / "prebuild.log", timeout_s=opts.timeout_s)
        rc = _launch(cmd, rank_cmd, n=p.world_size, env=env, log_path=log_path, timeout_s=max(1.0, left)) \
            if left > 0 else _timed_out_before_launch(log_path, opts.timeout_s)
        removed = remove_shm_buffers(env, p.world_size) if opts.device == "cpu" else []
        left = opts.timeout_s - (time.time() - t0)
        if rc and port_taken(log_path) and left > 0:
            # the rendezvous port was taken between its choice and the store's bind: nothing ran,
            # so the run is started once more on another port, and the manifest says so
            first = log_path.replace(out / "train.attempt1.log")
            relaunched = {"reason": f"rendezvous port {env['MASTER_PORT']} in use (EADDRINUSE)",
                          "first_log": first.name, "first_returncode": rc}
            env["MASTER_PORT"] = str(rendezvous.free_port())
            rc = _launch(cmd, rank_cmd, n=p.world_size, env=env, log_path=log_path, timeout_s=max(1.0, left))
            removed += remove_shm_buffers(env, p.world_size) if opts.device == "cpu" else []
    except KeyboardInterrupt as e:  # the ranks are ended (_launch); the run directory says so, then on
        removed += remove_shm_buffers(env, p.world_size) if opts.device == "cpu" else []
        _close(out, cfg, opts, rc=rc, removed=removed, relaunched=relaunched, shown=shown, launcher=launcher,
               source=source, data=data, env=env, t0=t0, interrupted=interrupt_name(e))
        raise
    return _close(out, cfg, opts, rc=rc, removed=removed, relaunched=relaunched, shown=shown, launcher=launcher,
                  source=source, data=data, env=env, t0=t0)


def _close(out: Path, cfg: TrainConfig, opts: RunOptions, *, rc: int | None, removed: list[str],
           relaunched: dict | None, shown: list[str], launcher: str, source: Path, data: Dataset, env: dict,
           t0: float, interrupted: str | None = None) -> RunCheck:
    """Parse the log, judge the run and write its iterations and manifest (``interrupted``: the
    signal that stopped it, which makes the run ``interrupted`` whatever it logged)."""
    m, p = cfg.model, cfg.parallel
    rank_tmp = out / "tmp"
    left_tmp = sorted(x.name for x in rank_tmp.iterdir()) if rank_tmp.is_dir() else []
    shutil.rmtree(rank_tmp, ignore_errors=True)
    log_path = out / "train.log"
    res = parse_log(log_path if log_path.is_file() else io.StringIO(""))  # interrupted before any rank
    check = check_iterations(res.iterations, train_iters=opts.train_iters, returncode=rc)
    if interrupted:
        check = RunCheck("interrupted", [f"interrupted by {interrupted}", *check.reasons], check.num_iterations)
    _write_iterations(out, res)
    manifest = {"schema": SCHEMA, "status": check.status, "reasons": check.reasons,
                "num_iterations": check.num_iterations, "train_iters": opts.train_iters,
                "command": shown, "launcher": launcher, "device": opts.device, "returncode": rc,
                "config": {"model": dataclasses.asdict(m), "parallel": dataclasses.asdict(p)},
                "framework": {"source": str(source), **framework_identity(source),
                              "entry": "pretrain_gpt.py"},
                "versions": _versions(), "dataset": str(data.prefix), "removed_shm": removed,
                "relaunched": relaunched, "removed_tmp": left_tmp,
                "env": {k: env[k] for k in sorted(env) if k.split("_")[0] in
                        ("DS", "OMP", "LOCAL", "WANDB", "NCCL", "CCL", "CUDA", "MASTER", "TMPDIR")},
                "start": t0, "end": time.time()}
    if interrupted:
        manifest["signal"] = interrupted
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return check


def _job_options(cfg: TrainConfig, opts: RunOptions, *, data: Dataset, ds_config: Path) -> JobOptions:
    """The job script's table of Megatron flags, with what differs on a laptop: NullTokenizer
    over the synthetic data, gloo on a CPU, no data-loader workers, a fixed seed."""
    return JobOptions(nodes=1, ranks_per_node=cfg.parallel.world_size, train_script="pretrain_gpt.py",
                      train_iters=opts.train_iters, backend="gloo" if opts.device == "cpu" else "nccl",
                      tokenizer_args=("--tokenizer-type", "NullTokenizer", "--vocab-size", str(data.vocab_size_arg),
                                      "--make-vocab-size-divisible-by", "1"),
                      data_path=str(data.prefix), ds_config=str(ds_config),
                      timing_log_level=opts.timing_log_level,
                      extra_args=("--num-workers", "0", "--seed", "1234"))


def _rank_env(n: int, *, device: str, data: Dataset) -> dict[str, str]:
    """The ranks' environment: this project on PYTHONPATH (the rank wrapper), no wandb or
    colour, DeepSpeed's CPU accelerator and an even share of the cores on a CPU, a free port."""
    env = dict(os.environ, WANDB_MODE="disabled", NO_COLOR="1", LOCAL_SIZE=str(n), PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path(data.prefix).parents[2] / "torch_extensions")),
               PYTHONPATH=os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH")) if x))
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # the probes' policy (microbench.runtime.launch): the cores shared evenly by the local ranks
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = str(rendezvous.free_port())
    return env


PORT_TAKEN = "EADDRINUSE"
"""What torch's TCPStore prints when its port is taken (``DistNetworkError ... code: -98,
name: EADDRINUSE``)."""


def port_taken(log_path: Path) -> bool:
    """Whether a failed run died on its rendezvous port being in use, before any iteration."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return any(PORT_TAKEN in line for line in lines) and parse_log(lines).iterations.empty


def _write_iterations(out: Path, res: ParseResult) -> None:
    """``iterations.csv`` (one row per iteration: several ranks may print the same line) and
    ``iterations.json`` (everything parsed)."""
    it = res.iterations
    if len(it):
        it = it.drop_duplicates(subset=["iteration"], keep="last")
    it.to_csv(out / "iterations.csv", index=False)
    (out / "iterations.json").write_text(json.dumps(res.to_json_obj()))


PREBUILD = [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"]
"""DeepSpeed's CPU communication op (``deepspeed_shm_comm``), JIT-compiled by the first rank
that starts the engine when the environment has no build of it (a fresh venv)."""


def prebuild_cpu_ops(env: dict, *, log_path: Path, timeout_s: float, cmd: list[str] | None = None) -> float:
    """Build (or just load) DeepSpeed's CPU op in one process of a session of its own before
    any rank starts, and return the seconds it took. Inside the ranks the compiler's
    processes escape the launcher's kill and keep the build lock, so every later run waits
    on it; here a timeout kills the whole session, compiler included, and removes the lock
    it held (written to the log)."""
    t0 = time.monotonic()
    lock = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    with open(log_path, "w", encoding="utf-8") as log:
        if lock.is_file() and not _building_in(lock.parent):
            lock.unlink(missing_ok=True)  # torch waits on a lock file forever, whoever left it
            log.write(f"full_model.megatron: removed a stale build lock {lock} (no process builds in "
                      f"{lock.parent})\n")
            log.flush()
        proc = subprocess.Popen(cmd or PREBUILD, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=term_with_parent)
        try:
            proc.wait(timeout=timeout_s)
        except KeyboardInterrupt as e:  # its own session: a Ctrl-C or a kill of ours does not reach it
            _kill_group(proc)
            lock.unlink(missing_ok=True)
            log.write(f"\nfull_model.megatron: interrupted by {interrupt_name(e)} while building; killed\n")
            raise
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            gone = lock.is_file()
            lock.unlink(missing_ok=True)
            log.write(f"\nfull_model.megatron: the op build timed out after {timeout_s:.0f} s; killed"
                      + (f", its lock {lock} removed\n" if gone else "\n"))
    return time.monotonic() - t0


SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""DeepSpeed's CPU allreduce workspace, one per rank (``deepspeed/ops/csrc/cpu/comm/shm.cpp``,
``shm_initialize``): about 66 MiB each, created by every run and never unlinked."""


def remove_shm_buffers(env: dict, n: int) -> list[str]:
    """Unlink the shared-memory workspaces this run's ranks left (named by its MASTER_ADDR and
    MASTER_PORT, so no other run's) and return their paths for the manifest. Left behind they
    fill ``/dev/shm``, which is RAM: a few hundred runs took 20 GiB of a 24 GiB machine."""
    removed = []
    for rank in range(n):
        path = Path(SHM_BUFFER.format(uid=os.getuid(), addr=env["MASTER_ADDR"], port=env["MASTER_PORT"], rank=rank))
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _building_in(directory: Path) -> bool:
    """Whether a live process works in ``directory`` (ninja and the compiler run there)."""
    target = str(directory.resolve())
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd) == target:
                return True
        except OSError:
            continue
    return False


def _timed_out_before_launch(log_path: Path, timeout_s: float) -> int:
    log_path.write_text(f"full_model.megatron: timed out after {timeout_s:.0f} s building DeepSpeed's CPU op "
                        f"(prebuild.log); no rank started\n")
    return 124


def _launch(cmd: list[str] | None, rank_cmd: list[str], *, n: int, env: dict, log_path: Path,
            timeout_s: float) -> int | None:
    """Run to completion with every rank's output in one log; a timeout kills the whole group."""
    with open(log_path, "w", encoding="utf-8") as log:
        if cmd is not None:
            procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, preexec_fn=term_with_parent)]
        else:
            procs = [subprocess.Popen(rank_cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=term_with_parent,
                                      env=dict(env, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                               LOCAL_WORLD_SIZE=str(n))) for r in range(n)]
        deadline = time.monotonic() + timeout_s
        rcs: list[int | None] = []
        try:
            for proc in procs:
                rcs.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                _kill_group(q)
            log.write(f"\nfull_model.megatron: timed out after {timeout_s:.0f} s; killed\n")
            return 124
        except KeyboardInterrupt as e:  # the ranks lead sessions of their own: nothing else ends them
            for q in procs:
                _kill_group(q)
            log.write(f"\nfull_model.megatron: interrupted by {interrupt_name(e)}; every rank killed\n")
            raise
    return next((r for r in rcs if r), 0)


def _kill_group(proc: subprocess.Popen, *, wait_s: float = 10.0) -> None:
    """SIGKILL the session ``proc`` leads and wait (bounded) until none of it is left: on a
    loaded host a killed compiler can run on for a moment before the kill takes."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    end = time.monotonic() + wait_s
    while _live_members(proc.pid) and time.monotonic() < end:
        time.sleep(0.02)


def _live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that have not ended (zombies are ended)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            live.append(int(entry))
    return live
