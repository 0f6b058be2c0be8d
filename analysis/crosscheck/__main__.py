"""``python -m analysis.crosscheck compare | local | megatron`` (see :mod:`analysis.crosscheck`)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from microbench.harness.cli import ArgumentParser, user_path
from microbench.harness.lifecycle import interrupted_exit, raise_on_terminate
from microbench.runtime.results import default_out_dir

from analysis.crosscheck import (CrossCheckError, MeasuredStep, check_profile_matches, compare, format_table,
                                 measured_from_log, measured_from_run)
from analysis.crosscheck.local import DEFAULT_LAYOUTS, run_local
from analysis.crosscheck.megatron import add_args as add_megatron_args, main_megatron
from analysis.crosscheck.probes import ran_past
from analysis.measured import load_profile
from analysis.predict import add_config_args, config_from_args


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m analysis.crosscheck", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one measured run (run directory or Megatron log) vs its prediction")
    c.add_argument("measured", help="full_model.train run directory, or a Megatron-DeepSpeed log file")
    add_config_args(c)
    c.add_argument("--warmup-steps", type=int, default=1, help="log iterations left out (logs only)")
    c.add_argument("--allow-shape-mismatch", action="store_true",
                   help="accept a measured profile taken at other shapes than the run's")
    c.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    loc = sub.add_parser("local", help="probes → profile → prediction → reference step → table, per layout")
    loc.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated (default {DEFAULT_LAYOUTS})")
    loc.add_argument("--model", default="tiny", help="preset")
    loc.add_argument("--steps", type=int, default=6, help="reference-step iterations per layout")
    loc.add_argument("--warmup-steps", type=int, default=1)
    loc.add_argument("--system", default=None, help="fallback spec for what no probe measured")
    loc.add_argument("--out", type=user_path, default=None, help="where probe and training runs go (default results/crosscheck-<time>)")
    loc.add_argument("--json", action="store_true", help="also print one JSON line per layout")
    add_megatron_args(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        with raise_on_terminate():
            return {"megatron": main_megatron, "local": main_local, "compare": main_compare}[a.cmd](a)
    except KeyboardInterrupt as e:
        return interrupted_exit("analysis.crosscheck", e, "every child ended; the run directories keep what was "
                                "measured")
    except (CrossCheckError, ValueError, FileNotFoundError) as e:
        print(f"error: analysis.crosscheck: {e}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as e:  # a probe or framework run past --timeout-s: a failed case
        print(f"error: analysis.crosscheck: {ran_past(e)}", file=sys.stderr)
        return 1


def main_local(a: argparse.Namespace) -> int:
    out = a.out or user_path(str(default_out_dir("crosscheck")))
    if a.warmup_steps < 0 or a.steps <= a.warmup_steps:
        raise CrossCheckError(f"--steps {a.steps} --warmup-steps {a.warmup_steps}: need warm-up ≥ 0 and steps "
                              "above it")
    rows, notes = run_local([s for s in a.layouts.split(",") if s], model=a.model, steps=a.steps,
                            warmup=a.warmup_steps, out=out, system=a.system)
    print(format_table(rows))
    for n in notes:
        print(f"note: {n}")
    print(f"# runs: {out}")
    if a.json:
        for r in rows:
            print(json.dumps(r.to_dict()))
    return 0


def main_compare(a: argparse.Namespace) -> int:
    if a.warmup_steps < 0:
        raise CrossCheckError(f"--warmup-steps {a.warmup_steps}: must be ≥ 0")
    measured = _measured(a)
    if a.profile and not a.allow_shape_mismatch:
        check_profile_matches(measured.config, a.profile)
    profile = load_profile(system=a.system, profile_dirs=a.profile, include_failed=a.include_failed,
                           allow_incomplete=a.allow_incomplete)
    cmp = compare(measured, profile)
    print(json.dumps(cmp.to_dict()) if a.json else format_table([cmp]))
    return 0


def _measured(a: argparse.Namespace) -> MeasuredStep:
    """A run directory carries its configuration (flags, if any, must agree with it); a log
    does not (the flags state it)."""
    path = Path(a.measured)
    if path.is_dir():
        measured = measured_from_run(path)
        stated = [f for f in ("model", "tp", "pp", "dp", "mbs", "gbs") if getattr(a, f) is not None]
        if stated:
            given = config_from_args(a)
            if (given.model, given.parallel) != (measured.config.model, measured.config.parallel):
                raise CrossCheckError(f"{path}: the run's manifest config differs from the one stated on the "
                                      f"command line ({', '.join('--' + f for f in stated)}); drop the flags "
                                      "to use the manifest's")
        return measured
    if path.is_file():
        if a.model is None and a.layers is None:
            raise CrossCheckError(f"{path}: a log does not carry its configuration; state it with --model "
                                  "PRESET (or dims) and --tp --pp --dp --mbs --gbs")
        return measured_from_log(path, config_from_args(a), warmup=a.warmup_steps)
    raise CrossCheckError(f"{path}: no such run directory or log file")


if __name__ == "__main__":
    sys.exit(main())
