"""The flags every probe shares, and their checks before any rank starts.

A bad value is a :class:`~microbench.runtime.launch.UsageError`: one line, exit 2, printed once by
the process that parses the command line (the embedded world's parent, or every rank of a
launched world before it initialises anything).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import TYPE_CHECKING, Sequence

from microbench.harness.cli import ArgumentParser
from microbench.harness.modelargs import DIM_FLAGS, add_model_args, config_from_args
from microbench.runtime.world import BACKENDS, DEVICES
from microbench.model.grid import Grid
from microbench.runtime.errors import UsageError

if TYPE_CHECKING:
    from microbench.harness.contract import Probe

PROBE_MODEL_FLAGS = ("model", *DIM_FLAGS, "tp", "pp", "dp", "mbs", "recompute", "sequence-parallel", "zero")
"""A probe measures a preset's shapes on a layout, its dimensions overridden where stated
(``--model mds-cpu --hidden 256 --seq 256``: the shapes a framework run of that model has)."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: far above any real run, far below timedelta's limit

TORCH_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "half": "float16",
                "float16": "float16", "fp32": "float32", "float": "float32", "float32": "float32",
                "fp64": "float64", "double": "float64", "float64": "float64",
                "int32": "int32", "int": "int32", "int64": "int64"}
CANONICAL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                   "int32": "int32", "int64": "int64"}


def parse_size(text: str) -> int:
    """'1K' → 1024, '16M', '2G', '100' bytes (binary suffixes, as nccl-tests)."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMGT" and t else t
    try:
        value = float(digits) * mult
    except ValueError:
        raise UsageError(f"size {text!r} is not a number with an optional K/M/G suffix") from None
    if not math.isfinite(value):
        raise UsageError(f"size {text!r} must be a finite number of bytes")
    if value <= 0 or value != int(value):
        raise UsageError(f"size {text!r} must be a positive whole number of bytes")
    return int(value)


def canonical_dtype(name: str) -> str:
    try:
        return CANONICAL_DTYPE[TORCH_DTYPES[name.lower()]]
    except KeyError:
        raise UsageError(f"-d/--dtype {name!r}: choose one of bf16, fp16, fp32, fp64, int32") from None


def torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name.lower()])


def common_parser(probe: Probe) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"python -m {probe.module}", description=probe.description)
    p.add_argument("-n", "--iters", type=int, default=probe.default_iters, help="timed iterations per case")
    p.add_argument("-w", "--warmup", type=int, default=probe.default_warmup, help="warm-up iterations per case")
    p.add_argument("-d", "--dtype", default=None, help="bf16|fp16|fp32|fp64 (default: the model's, else fp32)")
    p.add_argument("-c", "--check", type=int, default=1, choices=(0, 1), help="check results after timing (1/0)")
    p.add_argument("--out", default=None, help="run directory (default results/<probe>-<time>)")
    p.add_argument("--backend", default="auto", help="|".join(BACKENDS))
    p.add_argument("--device", default="auto", help="|".join(DEVICES))
    p.add_argument("--timeout-s", type=float, default=300.0, help="timeout of every process group (s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the embedded world when no launcher is found")
    p.add_argument("--statistic", default="median", choices=("median", "mean", "min"), help="reported statistic")
    add_model_args(p, flags=PROBE_MODEL_FLAGS, layout="world", optional=True)
    p.add_argument("--quiet", action="store_true", help="no table on standard output")
    probe.add_args(p)
    return p


def validate_run_flags(args: argparse.Namespace, *, backends: Sequence[str] = BACKENDS) -> None:
    """The flags every entry point shares: iterations, ranks, timeout, device, backend."""
    for flag, value, low in (("-n/--iters", args.iters, 1), ("-w/--warmup", args.warmup, 0),
                             ("--ranks", args.ranks, 1)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be ≥ {low}")
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise UsageError(f"--timeout-s {args.timeout_s}: must be > 0 and ≤ {MAX_TIMEOUT_S:g} "
                         "(a finite number of seconds)")
    if args.backend not in backends:
        raise UsageError(f"--backend {args.backend!r}: choose one of {', '.join(backends)}")
    if args.device not in DEVICES:
        raise UsageError(f"--device {args.device!r}: choose one of {', '.join(DEVICES)}")
    check_thread_env(os.environ)


def check_thread_env(env) -> None:
    """``OMP_NUM_THREADS``, where set, is a positive count (or OpenMP's comma list of them).
    Anything else, libgomp warns about and ignores, and since a set variable also stops the
    suite sharing the node's cores between its ranks, every rank would run the default
    thread count: oversubscribed CPU timings, nothing said but a warning in the middle."""
    value = env.get("OMP_NUM_THREADS")
    if value is None:
        return
    parts = value.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise UsageError(f"environment variable OMP_NUM_THREADS={value!r} is not a positive thread "
                         "count (e.g. 1, or 4,2 for nested levels); set it or unset it")


def validate_common(args: argparse.Namespace) -> None:
    validate_run_flags(args)
    if args.dtype is not None:
        args.dtype = canonical_dtype(args.dtype)
    config_from_args(args, layout="world")  # shape errors before anything starts


def make_grid(args: argparse.Namespace, world_size: int) -> Grid:
    tp, pp = args.tp or 1, args.pp or 1
    dp = args.dp if args.dp is not None else world_size // (tp * pp)
    grid = Grid(tp=tp, pp=pp, dp=max(dp, 1))
    if grid.size != world_size:
        raise UsageError(f"tp({tp}) × pp({pp}) × dp({dp}) = {grid.size} ≠ world {world_size}")
    return grid


def check_out(path: str) -> None:
    """``--out`` must be a new (or empty) directory this user can create: a run directory is
    written once (see :func:`microbench.runtime.results.check_out_dir`)."""
    from microbench.runtime.results import check_out_dir
    try:
        d = check_out_dir(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:  # the real test of "can this user write here" (root passes os.access everywhere)
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create the run directory: {e.strerror}") from None


def memory_per_rank_bytes(device: str, ranks_per_node: int) -> tuple[int, str] | None:
    """(bytes, how) one rank may use: a device's memory, or the host's RAM shared by the ranks
    of a node for the CPU. None where it cannot be known without starting a device."""
    try:
        import torch
        kinds = [k for k in ("xpu", "cuda") if device in ("auto", k)
                 and getattr(torch, k, None) is not None and getattr(torch, k).is_available()]
    except Exception:
        return None
    if kinds:
        try:
            total = getattr(torch, kinds[0]).get_device_properties(0).total_memory
        except Exception:
            return None
        return int(total), f"{kinds[0]} device memory {total / 2**30:.1f} GiB"
    if device not in ("auto", "cpu"):
        return None  # asked for a device that is not here: init_world says so
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    n = max(1, ranks_per_node)
    return ram // n, f"{ram / 2**30:.1f} GiB RAM / {n} rank(s) on this node"


def check_memory(args: argparse.Namespace, need_bytes: int | None, *, ranks_per_node: int) -> None:
    """Refuse a buffer larger than one rank's memory before any rank starts (``-e 1T``)."""
    if not need_bytes:
        return
    have = memory_per_rank_bytes(args.device, ranks_per_node)
    if have is not None and need_bytes > have[0]:
        raise UsageError(f"a buffer of {need_bytes / 2**30:.4g} GiB does not fit one rank's "
                         f"memory ({have[0] / 2**30:.4g} GiB: {have[1]}); lower -e/--maxbytes")
