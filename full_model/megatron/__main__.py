"""Megatron-DeepSpeed on the real machine: parse its logs, generate its PBS job script.

    python -m full_model.megatron parse LOG [--csv FILE | --json] [--strict]
    python -m full_model.megatron script --model alcf-1t --nodes 64 [-o FILE] [--with-probes]
                                         [--tp N --pp N --dp N --mbs N --gbs N] …
    python -m full_model.megatron install [--vendor ../shared/vendor]
    python -m full_model.megatron run [--source DIR] --model tiny --tp 2 [--iters 10] [--out DIR]

Why one entry point: the measured side of the cross-check is "run this script, parse that
log"; both halves must agree on the configuration, so they live together. The work is in
:mod:`full_model.megatron.logparse` and :mod:`full_model.megatron.jobscript`; this module is the CLI and the
public API. User errors print one ``error: …`` line and exit 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import pandas as pd

from full_model.megatron.jobscript import JobOptions, layout_for, render_job_script
from full_model.megatron.logparse import ParseResult, parse_log
from full_model.megatron.setup import EZPZ_COMMIT, MEGATRON_COMMIT, default_vendor_dir
from microbench.harness.cli import ArgumentParser, user_path
from microbench.harness.modelargs import DIM_FLAGS, add_model_args, config_from_args
from microbench.model.config import PRESETS
from microbench.runtime.results import default_out_dir

EXIT_USAGE = 2
RUN_MODEL_FLAGS = ("model", *DIM_FLAGS, "dtype", "tp", "pp", "dp", "mbs", "gbs", "recompute", "sequence-parallel",
                   "zero")
"""What ``run`` offers: full recompute (DeepSpeed's activation checkpointing, a no-op stream on the
CPU accelerator), sequence parallelism (tp > 1), ZeRO 0-2 (ZeRO-2 at pp 1, without DeepSpeed's
pipeline engine). Selective recompute and ZeRO-3 are not offered: not verified here."""
_SHOW_LINES = 5  # line numbers named in a warning before "…"
_TABLE_COLUMNS = ["iteration", "elapsed_ms", "lm_loss", "samples_per_second",
                  "tokens_per_gpu_per_second", "tflops_lm", "tflops_ds", "tflops",
                  "tflops_formula", "format"]


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def _linenos(items: list[tuple[int, str]]) -> str:
    nums = [str(n) for n, _ in items[:_SHOW_LINES]]
    return ", ".join(nums) + (", …" if len(items) > _SHOW_LINES else "")


def _cmd_parse(args: argparse.Namespace) -> int:
    name = args.log
    try:
        result = parse_log(sys.stdin if name == "-" else name)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied") from None
    if result.unreadable:
        print(f"warning: {name}: {len(result.unreadable)} line(s) look like iteration records "
              f"but could not be read (lines {_linenos(result.unreadable)})", file=sys.stderr)
    if result.warnings:
        print(f"warning: {name}: {len(result.warnings)} record(s) read with problems "
              f"(lines {_linenos(result.warnings)}); first: {result.warnings[0][1]}",
              file=sys.stderr)
    if result.iterations.empty:
        raise UserError(f"{name}: no iteration lines found")
    if args.json:
        print(json.dumps(result.to_json_obj()))
    elif args.csv:
        try:
            result.iterations.to_csv(args.csv, index=False)
        except OSError as exc:
            raise UserError(f"{args.csv}: cannot write: {exc.strerror}") from None
        print(f"wrote {len(result.iterations)} iteration rows to {args.csv}")
    else:
        _print_summary(result)
    return 1 if args.strict and result.unreadable else 0


def _print_summary(result: ParseResult) -> None:
    """A human table, then one JSON line with the steady-state median (pyperf-style)."""
    it = result.iterations
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(it[_TABLE_COLUMNS].to_string(index=False))
    steady = it[it["iteration"] > it["iteration"].min()] if len(it) > 1 else it
    summary = {"num_iterations": len(it), "median_elapsed_ms": float(steady["elapsed_ms"].median()),
               "excluded_first_iteration": len(it) > 1, "num_timer_rows": len(result.timers),
               "num_comms_rows": len(result.comms), "num_unreadable": len(result.unreadable)}
    print(json.dumps(summary))


def _cmd_script(args: argparse.Namespace) -> int:
    try:
        cfg = layout_for(args.model, nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                         tp=args.tp, pp=args.pp, dp=args.dp, micro_batch=args.mbs,
                         global_batch=args.gbs)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    opts = JobOptions(nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                      account=args.account, queue=args.queue, walltime=args.walltime,
                      filesystems=args.filesystems, train_script=args.train_script,
                      megatron_dir=args.megatron_dir, train_iters=args.train_iters,
                      backend=args.backend, with_probes=args.with_probes,
                      comms_logger=args.comms_logger, extra_args=tuple(args.extra_arg),
                      env=env)
    text = render_job_script(cfg, opts=opts)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise UserError(f"{args.output}: cannot write: {exc.strerror}") from None
        p = cfg.parallel
        print(f"wrote {args.output}: {args.nodes} nodes × {args.ranks_per_node} ranks, "
              f"tp {p.tp} pp {p.pp} dp {p.dp}, mbs {p.micro_batch} gbs {p.global_batch}",
              file=sys.stderr)
    return 0



def _cmd_install(args: argparse.Namespace) -> int:
    from full_model.megatron.setup import SetupError, install
    try:
        root = install(args.vendor or default_vendor_dir())
    except SetupError as exc:
        raise UserError(str(exc)) from None
    print(f"Megatron-DeepSpeed {MEGATRON_COMMIT[:8]} ready at {root}; ezpz {EZPZ_COMMIT[:7]} installed")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from full_model.megatron.run import RunOptions, refuse_unrunnable, run
    from full_model.megatron.setup import SetupError, resolve_source
    from microbench.runtime.errors import UsageError as RtUsage
    from full_model.megatron import profilehook
    from microbench.harness.lifecycle import interrupted_exit, raise_on_terminate
    from microbench.harness.options import check_thread_env
    from microbench.runtime.launch import detect_launcher
    info = detect_launcher()
    if info is not None and (info.world_size or 1) > 1:
        raise UserError(f"run under {info.launcher} with {info.world_size} ranks: `run` starts its own ranks "
                        "(--launcher mpiexec|spawn); start it as one process")
    try:
        check_thread_env(os.environ)
        profilehook.check_env(os.environ)
        cfg = config_from_args(args, layout="world")
        refuse_unrunnable(cfg, args.device)
        source = resolve_source(args.source)
    except (RtUsage, SetupError, ValueError) as exc:
        raise UserError(str(exc)) from None
    out = args.out or user_path(str(default_out_dir("megatron")))  # absolute: ranks start in the checkout
    opts = RunOptions(source=source, out=out, train_iters=args.iters, launcher=args.launcher,
                      device=args.device, timeout_s=args.timeout_s)
    try:
        with raise_on_terminate():
            check = run(cfg, opts)
    except SetupError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt as exc:
        return interrupted_exit("full_model.megatron", exc, f"every rank ended; {out}/manifest.json says so")
    p = cfg.parallel
    print(f"{out}: {check.status}, {check.num_iterations}/{args.iters} iterations, tp {p.tp} pp {p.pp} "
          f"dp {p.dp}" + (f"; {'; '.join(check.reasons)}" if check.reasons else ""))
    if check.status == "ok":
        it = pd.read_csv(out / "iterations.csv")
        steady = it[it["iteration"] > 1]["elapsed_ms"] if len(it) > 1 else it["elapsed_ms"]
        print(json.dumps({"run": str(out), "status": check.status, "median_elapsed_ms": float(steady.median()),
                          "final_lm_loss": float(it["lm_loss"].iloc[-1])}))
    return 0 if check.status == "ok" else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m full_model.megatron", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("parse", help="read a Megatron-DeepSpeed log")
    p.add_argument("log", metavar="LOG", help="log file, or - for stdin")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="FILE", help="write the iteration rows as CSV")
    out.add_argument("--json", action="store_true",
                     help="print iterations, timers, comms and unreadable lines as one JSON object")
    p.add_argument("--strict", action="store_true", help="exit 1 if any line was unreadable")
    p.set_defaults(func=_cmd_parse)

    s = sub.add_parser("script", help="write a PBS job script for Megatron-DeepSpeed on Aurora")
    s.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    s.add_argument("--nodes", required=True, type=_positive_int)
    s.add_argument("--ranks-per-node", type=_positive_int, default=12)
    s.add_argument("-o", "--output", metavar="FILE", help="write here (default stdout)")
    s.add_argument("--with-probes", action="store_true",
                   help="run python -m microbench on the same allocation first")
    for flag, help_ in (("--tp", "tensor-parallel size"), ("--pp", "pipeline stages"),
                        ("--dp", "data-parallel replicas (default: fill the allocation)"),
                        ("--mbs", "micro-batch size"), ("--gbs", "global batch size")):
        s.add_argument(flag, type=_positive_int, help=help_)
    s.add_argument("--account", default="YOUR_PROJECT", help="PBS -A")
    s.add_argument("--queue", default="prod", help="PBS -q")
    s.add_argument("--walltime", default="01:00:00", help="PBS walltime HH:MM:SS")
    s.add_argument("--filesystems", default="home:flare", help="PBS -l filesystems")
    s.add_argument("--train-script", default="pretrain_gpt_alcf.py",
                   help="Megatron-DeepSpeed entry point (e.g. pretrain_gpt.py)")
    s.add_argument("--megatron-dir", default="$PBS_O_WORKDIR/Megatron-DeepSpeed")
    s.add_argument("--train-iters", type=_positive_int, default=10)
    s.add_argument("--backend", default="ccl", choices=["ccl", "nccl", "gloo"])
    s.add_argument("--comms-logger", action="store_true", help="enable DeepSpeed's comms logger")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="add or override an exported variable (repeatable)")
    s.add_argument("--extra-arg", action="append", default=[], metavar="ARG",
                   help="append one argument to the Megatron command line (repeatable)")
    s.set_defaults(func=_cmd_script)

    i = sub.add_parser("install", help="verify and unpack the vendored Megatron-DeepSpeed, install ezpz")
    i.add_argument("--vendor", type=user_path, help="directory with the archives (default ../shared/vendor)")
    i.set_defaults(func=_cmd_install)

    r = sub.add_parser("run", help="run the real pretrain_gpt.py for a model and layout")
    r.add_argument("--source", type=user_path, help="Megatron-DeepSpeed checkout (default $MEGATRON_DEEPSPEED, "
                                                    "else the vendored archive unpacked in the cache)")
    add_model_args(r, flags=RUN_MODEL_FLAGS, layout="world", model="tiny",
                   choices={"zero": (0, 1, 2), "recompute": ("none", "full")},
                   defaults={"zero": 0, "recompute": "none", "sequence-parallel": False})
    r.add_argument("--iters", type=_positive_int, default=10, help="training iterations")
    r.add_argument("--launcher", choices=("auto", "mpiexec", "spawn"), default="auto",
                   help="mpiexec (ezpz reads its rank from MPI) or spawn local ranks (default: mpiexec if found)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--timeout-s", type=float, default=1800.0, help="the whole run's limit")
    r.add_argument("--out", type=user_path, help="run directory (default results/megatron-<time>)")
    r.set_defaults(func=_cmd_run)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
