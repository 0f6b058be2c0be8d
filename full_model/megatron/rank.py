"""One rank of a Megatron-DeepSpeed run: set the rank variables, apply the CPU workarounds, exec.

    python -m full_model.megatron.rank SOURCE_DIR SCRIPT [megatron args...]

Why a wrapper instead of edits: the checkout stays pristine (it is the benchmark's pinned
commit), so every workaround is applied here, in the rank's own process, before the
framework's entry point runs, and each names its upstream cause
(``../shared/vendor/README.md``):

* rank variables — ``pretrain_gpt.py`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when it
  parses its arguments, before DeepSpeed would set them from MPI; under ``mpiexec`` we set them
  from the launcher (:func:`microbench.runtime.launch.detect_launcher`) and the rendezvous from MPI.
* torchvision import wall — ``megatron/training.py`` imports ``model/vision/knn_monitor.py`` →
  ``data/vit_dataset.py`` → torchvision at top level; a GPT run never calls it. Where
  torchvision is not installed (PyPI's is a CUDA build that breaks CPU torch), stub modules
  stand in and raise if anything from them is used.
* full-recompute wall — DeepSpeed 0.18.9's activation checkpointing
  (``runtime/activation_checkpointing/checkpointing.py``, line 526) calls
  ``get_accelerator().Stream(device=…)`` and never uses the stream; the CPU accelerator's
  ``Stream`` is ``None`` (TypeError: 'NoneType' object is not callable). On the CPU
  accelerator it becomes a class whose instances do nothing.
* ZeRO-1/2 gloo wall — DeepSpeed 0.18's ``DeepSpeedZeroOptimizer.step``
  (``runtime/zero/stage_1_and_2.py``) calls gloo's ``all_gather_into_tensor`` in grad mode,
  which raises; Megatron's train step catches it and skips every step silently. On the CPU
  accelerator the step runs under ``torch.no_grad()`` (an optimizer step needs no autograd).
* index-map race — this fork's ``megatron/data/gpt_dataset.py`` (``_build_index_mappings``)
  builds a dataset's index maps on *every* rank that does not find them, into the same files
  beside the data; a rank can read another's half-written file ("ValueError: mmap length is
  greater than file size": the grid of 2026-12-04, long-dp2's first run of a new sequence
  length on a fresh cache). On the CPU accelerator each rank gets its own
  ``--data-cache-path`` under the run's ``TMPDIR`` (removed with the run; a complete shared
  cache is still read first), unless the command gives one.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys
import tempfile
import types

STUBBED = ("torchvision", "torchvision.transforms", "torchvision.datasets")
SETUP_TIMEOUT_S = 300.0  # MPI initialisation and the address broadcast (the probes' --timeout-s default)


def _set_rank_env() -> None:
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        return
    from microbench.runtime.launch import detect_launcher, rendezvous, resolve_world
    info = detect_launcher()
    if info is None:  # a bare single process
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from microbench.runtime.launch import free_port
            os.environ["MASTER_PORT"] = str(free_port())
        return
    info, comm = resolve_world(info, timeout_s=SETUP_TIMEOUT_S)
    addr, port = rendezvous(info, comm, timeout_s=SETUP_TIMEOUT_S)
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank), MASTER_ADDR=addr, MASTER_PORT=str(port))
    if info.local_size:
        os.environ.setdefault("LOCAL_SIZE", str(info.local_size))


class _UnavailableMeta(type):
    def __getattr__(cls, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable(f"{cls.__qualname__}.{attr}")


def _unavailable(name: str) -> type:
    """Anything taken from a stubbed torchvision: a class (vit code subclasses VisionDataset)
    that fails loudly the moment it is instantiated or called."""
    def init(self, *a: object, **k: object) -> None:
        raise ImportError(f"{name}: torchvision is stubbed by full_model.megatron.rank "
                          "(not installed; a GPT run does not use it)")
    return _UnavailableMeta(name.rsplit(".", 1)[-1], (), {"__init__": init, "__qualname__": name})


def _module_getattr(module: str):
    def getattr_(attr: str) -> type:
        if attr.startswith("__"):  # introspection (inspect, pickle) must see a plain module
            raise AttributeError(attr)
        return _unavailable(f"{module}.{attr}")
    return getattr_


def _stub_torchvision() -> bool:
    if importlib.util.find_spec("torchvision") is not None:
        return False
    for name in STUBBED:
        mod = types.ModuleType(name)
        mod.__getattr__ = _module_getattr(name)  # type: ignore[attr-defined]
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []  # a package, so `import torchvision.transforms` resolves to the stub
        sys.modules[name] = mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torchvision"].datasets = sys.modules["torchvision.datasets"]  # type: ignore[attr-defined]
    return True


def _zero_step_no_grad() -> bool:
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return False
    import functools

    import torch
    from deepspeed.runtime.zero import stage_1_and_2 as z
    step = z.DeepSpeedZeroOptimizer.step

    @functools.wraps(step)
    def step_no_grad(self, *a, **k):
        with torch.no_grad():
            return step(self, *a, **k)
    z.DeepSpeedZeroOptimizer.step = step_no_grad
    return True


class _NoStream:
    """A stream that does nothing: what DeepSpeed's activation checkpointing asks the CPU
    accelerator for and never uses (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def _cpu_stream() -> bool:
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return False
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    CPU_Accelerator.Stream = property(lambda self: _NoStream)
    return True


def _index_cache_per_rank(args: list[str]) -> list[str]:
    """``args`` with a ``--data-cache-path`` of this rank's own on the CPU accelerator (the
    index-map race above); unchanged where the command names one or the device is not a CPU."""
    if os.environ.get("DS_ACCELERATOR") != "cpu" or any(a.split("=")[0] == "--data-cache-path" for a in args):
        return args
    base = os.environ.get("TMPDIR") or tempfile.gettempdir()
    return [*args, "--data-cache-path", os.path.join(base, f"index-cache-rank{os.environ.get('RANK', '0')}")]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m full_model.megatron.rank SOURCE_DIR SCRIPT [args...]")
    source, script, args = argv[0], argv[1], argv[2:]
    _set_rank_env()
    # deepspeed (→ transformers) first: transformers probes for torchvision at import and must
    # see the truth (absent), not the stub
    import deepspeed  # noqa: F401
    applied = [name for name, fn in (("zero-step-no-grad", _zero_step_no_grad),
                                     ("checkpoint-stream", _cpu_stream),
                                     ("torchvision-stub", _stub_torchvision)) if fn()]
    if os.environ.get("MICROBENCH_MDS_PROFILE"):  # opt-in diagnostics (full_model.megatron.profilehook)
        from full_model.megatron import profilehook
        profilehook.install(os.environ["MICROBENCH_MDS_PROFILE"], int(os.environ.get("RANK", "0")))
        applied.append("profilehook")
    cached = _index_cache_per_rank(args)
    if cached is not args:
        applied.append("index-cache-per-rank")
    args = cached
    if os.environ.get("RANK") == "0":
        print(f"full_model.megatron.rank: workarounds applied: {', '.join(applied) or 'none'}", flush=True)
    os.chdir(source)
    sys.path.insert(0, source)
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join(source, script), run_name="__main__")
    except BaseException as e:  # noqa: BLE001 — any way out but success ends the whole job
        _die(e)
    _leave()


def _leave() -> None:
    """The script returned: end this rank without Python's teardown, which destroys DeepSpeed's
    and gloo's live threads ("terminate called without an active exception", SIGABRT, exit 6:
    seen in CI on 2026-12-02 after a tp2 run had logged its last iteration, so the launcher
    called a finished run failed). MPI is finalized first (every rank gets here), so MPICH
    leaves no shared-memory segment behind."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(0)


def _die(e: BaseException) -> None:
    """End this rank at once with the error, skipping the exit handlers: under ``mpiexec``,
    mpi4py's MPI_Finalize waits for the other ranks, which wait in the rendezvous for this
    one, so a rank that failed early (a TCPStore port taken: EADDRINUSE, seen in the grid of
    2026-12-02) held the run until its timeout. MPI_Abort (where MPI is up), then a non-zero
    exit, make the launcher end the rest (an exit alone once left the other rank running in CI)."""
    import traceback
    code = e.code if isinstance(e, SystemExit) else 1
    if isinstance(e, SystemExit) and code in (0, None):
        _leave()
    if not isinstance(e, SystemExit):
        traceback.print_exception(e)
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
    print(f"full_model.megatron.rank: rank {os.environ.get('RANK', '?')} failed; ending it now", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    code = code if isinstance(code, int) and code else 1
    mpi = sys.modules.get("mpi4py.MPI")  # ezpz initialised MPI: MPI_Abort has the launcher end every rank
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        # no rank of this job reaches MPI_Finalize, which unlinks MPICH's node segment: unlink it
        # now (every local rank mapped it in MPI_Init, and a mapping outlives its name)
        from microbench.runtime.watchdog import mapped_segments
        for path in mapped_segments("self"):
            try:
                os.unlink(path)
            except OSError:
                pass
        mpi.COMM_WORLD.Abort(code)
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
