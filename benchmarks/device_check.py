"""Device check (not a test): the probes on one device, and the reference step at three widths
from host-bound to compute-bound against the prediction from those probes.

    bash benchmarks/device_check.sh                          # one GPU: ≤ 8 min
    bash benchmarks/device_check.sh --device cpu             # this CPU, CPU sizes: ~3 min on 2 cores
    python -m benchmarks.device_check --device cuda --widths 256,1024,4096 --out results/dc

Every step is a subprocess of the project's own command line, bounded, its output in a ``.log``
beside its run directory under ``--out``:

1. ``probes-1t``: ``python -m microbench --model alcf-1t --only gemm,attention,layer_ops --ranks 1``.
   The main job measures the TP-12 shard of alcf-1t on a world of one (its compute probes get
   ``--tp 12`` from the preset) and chooses the scale (1 on a GPU; on a CPU this script gives a
   small ``--scale`` so it takes seconds). gemm measures the square peak GEMM first and layer_ops
   the peak copy: the two cases ``python -m microbench.peak`` runs alone.
2. ``host-1t``: the host probe (``microbench.host``) through the same main job, ``--only host``.
3. per width: the compute probes at the reference step's exact dimensions (``measure_probes``
   of the cross-check), the host probe, ``python -m full_model.train`` on one rank, then
   ``python -m analysis.predict --profile <those probe runs> --system SPEC --json``. The host
   probe narrows every layer to hidden and sequence 64 (``HOST_WIDTH``), so widths whose
   narrowed layer is the same share one host run (as the cross-check shares probe runs).

What bounds it: on a GPU the small width is bound by the host (Python, autograd, launches), the
large one by the GEMMs (see GPU_WIDTHS); ``phases`` of the prediction says which bound each
phase, from the measured host and device seconds. The spec (dgx-h100 for cuda, aurora for xpu
and, as in the README's ``crosscheck local``, for cpu) prices only what no probe measured; the
``provenance`` of every width says how many seconds each word priced. Prints the table and one
JSON line; writes ``device_check.csv`` and ``device_check.json`` in ``--out``. Exit 0 when every
step ran (an error % is a result), 1 when a step failed or the time limit stopped the run (what
was measured is kept), 2 for a bad flag.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from microbench.harness.cli import ArgumentParser, user_path
from microbench.harness.lifecycle import interrupted_exit, raise_on_terminate
from microbench.runtime.errors import UsageError
from microbench.runtime.results import check_out_dir, default_out_dir

from analysis.crosscheck import CrossCheckError, check_profile_matches, measured_from_run
from analysis.crosscheck.probes import measure_probes, run_command
from benchmarks.device_check_report import format_table, machine_info, summarise_probes, write_outputs

MODULE = "benchmarks.device_check"
DEVICES = ("auto", "cuda", "xpu", "cpu")
SYSTEMS = {"cuda": "dgx-h100", "xpu": "aurora", "cpu": "aurora"}
TOP_COMPONENTS = 3

# GPU widths: a layer's forward GEMMs are 2·T·(4d² + 3·d·f) FLOP with f = 4d (SwiGLU: three d×f
# matrices), i.e. 32·T·d² at T = 2,048 tokens: 4.3 GFLOP at d = 256, 69 GFLOP at 1,024 and
# 1.1 TFLOP at 4,096, which take ≥ 4.3 µs, 69 µs and 1.1 ms at the H100/H200's 989.4 TFLOP/s dense
# bf16 peak (microbench/model/devices.yaml, from NVIDIA's data sheets) and grow 16× per step of 4×
# in d. The host's work per layer (the same operations' Python, autograd and kernel launches at
# every width: the host probe's premise, "host time taken as width-independent") does not grow,
# so d = 256 leaves the device waiting on the host, d = 4,096 the host waiting on the GEMMs, and
# 1,024 lies between. This is the design estimate; which side each width fell on is measured
# (host probe vs compute probes on this GPU): the ``bound`` column.
GPU_WIDTHS = (256, 1024, 4096)
CPU_WIDTHS = (64, 128, 256)  # 2 layers of 64 tokens: the whole CPU run in ~3 min on 2 cores


@dataclass(frozen=True)
class Plan:
    """What one device check runs: the widths' common dimensions and the iteration counts."""

    device: str
    widths: tuple[int, ...]
    preset: str
    """The preset the widths override (its dtype, norm, SwiGLU MLP and dropout are kept)."""
    head_dim: int
    layers: int
    seq: int
    vocab: int
    mbs: int
    gbs: int
    steps: int
    warmup_steps: int
    probe_iters: tuple[int, int]
    """(timed, warm-up) iterations of every probe case at the widths."""
    width_peak: bool
    """Whether the probes at the widths measure the peak GEMM and copy (only for MFU)."""
    campaign_flags: tuple[str, ...]
    """The main job's own flags for steps 1-2 (scale, iterations)."""
    time_limit_s: float

    @property
    def system(self) -> str:
        return SYSTEMS[self.device]


def make_plan(device: str, *, widths: Sequence[int] | None, quick: bool, time_limit_s: float | None) -> Plan:
    if device == "cpu":
        # fp32 (tiny): an AVX2-only core runs bf16 GEMMs ~40× slower. No peak at the widths:
        # the 2,048³ peak GEMM takes seconds here and every GEMM is priced at its measured shape.
        # The 1T shard at scale 1/128 (attention stays at 1/16: one head per rank), peak GEMM 256³.
        return Plan(device=device, widths=tuple(widths or CPU_WIDTHS), preset="tiny", head_dim=16, layers=2,
                    seq=64, vocab=512, mbs=1, gbs=1, steps=6 if quick else 8, warmup_steps=2,
                    probe_iters=(3, 1) if quick else (5, 1), width_peak=False,
                    campaign_flags=("--quick", "--scale", "0.0078125", "--peak-size", "256"),
                    time_limit_s=time_limit_s or 270.0)
    # bf16 Llama-style layer (llama2-7b: RMSNorm, SwiGLU, no dropout), head dim 128, 4 micro-batches
    # of 1 × 2,048 tokens per step so the step is mostly layers, not the optimizer.
    return Plan(device=device, widths=tuple(widths or GPU_WIDTHS), preset="llama2-7b", head_dim=128, layers=4,
                seq=2048, vocab=32000, mbs=1, gbs=4, steps=10 if quick else 20, warmup_steps=3 if quick else 5,
                probe_iters=(10, 3) if quick else (20, 5), width_peak=True,
                campaign_flags=("--quick",) if quick else (),
                time_limit_s=time_limit_s or 480.0)


def dims(plan: Plan, hidden: int) -> list[str]:
    """The model and layout flags a width shares between the probes, the step and the prediction."""
    heads = hidden // plan.head_dim
    return ["--model", plan.preset, "--layers", str(plan.layers), "--hidden", str(hidden), "--heads", str(heads),
            "--kv-heads", str(heads), "--ffn", str(4 * hidden), "--seq", str(plan.seq), "--vocab", str(plan.vocab),
            "--tp", "1", "--pp", "1", "--dp", "1", "--mbs", str(plan.mbs), "--recompute", "none"]


def step_flags(plan: Plan) -> list[str]:
    """What the step and the prediction add to :func:`dims`: the global batch, plain DP (one rank)."""
    return ["--gbs", str(plan.gbs), "--zero", "0"]


def width_config(plan: Plan, hidden: int):
    """The width's TrainConfig, read by the prediction's own parser (a bad width is refused here)."""
    from analysis.predict import add_config_args, config_from_args
    ap = ArgumentParser(prog=MODULE)
    add_config_args(ap)
    try:
        return config_from_args(ap.parse_args([*dims(plan, hidden), *step_flags(plan)]))
    except ValueError as e:
        raise UsageError(f"--widths {hidden}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Command line


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)} (auto: cuda, else xpu, else cpu)")
    p.add_argument("--out", default=None, help="new directory for every run and the table "
                                               "(default results/device-check-<time>)")
    p.add_argument("--widths", default=None, help=f"comma-separated hidden sizes (default GPU "
                   f"{','.join(map(str, GPU_WIDTHS))}, CPU {','.join(map(str, CPU_WIDTHS))})")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="stop after this long with what was measured (default 480 on a GPU, 270 on a CPU)")
    p.add_argument("--quick", action="store_true", help="fewer iterations and steps (a smoke run)")
    return p


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise UsageError(f"--device {name!r}: not one of {', '.join(DEVICES)}")
    if name == "cpu":
        return name
    import torch
    have = {"cuda": torch.cuda.is_available(), "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if name == "auto":
        return next((d for d in ("cuda", "xpu") if have[d]), "cpu")
    if not have[name]:
        raise UsageError(f"--device {name!r}: torch {torch.__version__} sees no {name} device here")
    return name


def parse_widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ws = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise UsageError(f"--widths {text!r}: not a comma-separated list of hidden sizes") from None
    if not ws or any(w < 1 for w in ws) or len(set(ws)) != len(ws):
        raise UsageError(f"--widths {text!r}: give distinct positive hidden sizes, e.g. 256,1024,4096")
    return ws


def validate(a) -> tuple[Plan, Path]:
    """Every flag, before anything runs (UsageError: one line, exit 2)."""
    if a.time_limit_s is not None and not a.time_limit_s > 0:
        raise UsageError(f"--time-limit-s {a.time_limit_s:g}: must be > 0")
    widths = parse_widths(a.widths)
    plan = make_plan(resolve_device(a.device), widths=widths, quick=a.quick, time_limit_s=a.time_limit_s)
    for w in plan.widths:
        if w % plan.head_dim:
            raise UsageError(f"--widths {w}: a hidden size must be a multiple of the head dim {plan.head_dim}")
        width_config(plan, w)
    out = user_path(a.out) if a.out else user_path(str(default_out_dir("device-check")))
    try:
        check_out_dir(out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return plan, out


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Check:
    """One device check: its steps as they ran, their results, and the deadline all obey."""

    plan: Plan
    out: Path
    deadline: float
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: dict[str, Any] | None = None

    @property
    def group_timeout_s(self) -> str:
        """Every probe's and the step's process-group timeout: one wait never takes a minute on one rank."""
        return str(min(60.0, self.plan.time_limit_s))

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one step (nothing once the time is up); record ok, failed or stopped, and its seconds."""
        if self.stopped:
            self.skip(name, "the time limit was reached earlier")
            return None
        t0 = time.monotonic()
        rec: dict[str, Any] = {"name": name}
        try:
            result = fn(*args)
            rec["status"] = "ok"
        except subprocess.TimeoutExpired as e:
            result = None
            what = e.cmd[2] if len(e.cmd) > 2 else e.cmd[0]  # python -m MODULE …
            rec.update(status="stopped", reason=f"time limit {self.plan.time_limit_s:g} s reached during {what}")
            self.stopped = {"step": name, "reason": rec["reason"]}
        except CrossCheckError as e:  # a command's non-zero exit, named with its log
            result = None
            rec.update(status="failed", reason=str(e))
        except Exception as e:  # anything else still leaves the steps before it on record
            result = None
            rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        self.steps.append(rec)
        print(f"# {name:<18} {rec['status']:<8} {rec['seconds']:>6.1f} s"
              + (f"  {rec['reason']}" if "reason" in rec else ""), file=sys.stderr, flush=True)
        return result

    def skip(self, name: str, reason: str) -> None:
        self.steps.append({"name": name, "status": "not run", "reason": reason})

    def command(self, cmd: list[str], run_dir: Path) -> subprocess.CompletedProcess:
        return run_command(cmd, timeout=self.plan.time_limit_s, log=run_dir.with_suffix(".log"),
                           deadline=self.deadline)

    def probe_flags(self) -> list[str]:
        return ["--device", self.plan.device, "--timeout-s", self.group_timeout_s,
                *(() if self.plan.width_peak else ("--no-peak",))]


def campaign(check: Check, only: str, name: str) -> dict[str, Any]:
    """Steps 1-2: the main job on a world of one, measuring alcf-1t's TP-12 shard."""
    d = check.out / name
    check.command([sys.executable, "-m", "microbench", "--model", "alcf-1t", "--only", only, "--ranks", "1",
                   "--no-predict", "--device", check.plan.device, "--timeout-s", check.group_timeout_s,
                   *check.plan.campaign_flags, "--out", str(d)], d)
    return summarise_probes(d)


def width_probes(check: Check, hidden: int, host_runs: dict[str, Path]) -> list[Path]:
    """The compute probes at the width's exact dimensions, and the host probe (shared by the
    widths whose layer narrows to the same one: the probe measures at HOST_WIDTH)."""
    from microbench.model.config import narrowed
    plan, wdir = check.plan, check.out / f"width-{hidden}"
    flags = [*dims(plan, hidden), *check.probe_flags()]
    dirs = measure_probes(width_config(plan, hidden), text=f"h{hidden}", out=wdir, done={},
                          timeout=plan.time_limit_s, compute_iters=plan.probe_iters, compute_only=True,
                          deadline=check.deadline, extra=check.probe_flags())
    key = repr(narrowed(width_config(plan, hidden)))
    if key not in host_runs:
        d = wdir / "probes" / "host-tp1-w1"
        n, w = plan.probe_iters
        check.command([sys.executable, "-m", "microbench.host", *flags, "-n", str(n), "-w", str(w),
                       "--ranks", "1", "--quiet", "--out", str(d)], d)
        host_runs[key] = d
    return [*dirs, host_runs[key]]


def width_step(check: Check, hidden: int) -> dict[str, Any]:
    """The reference step on one rank; its step times as the cross-check reads them."""
    plan, d = check.plan, check.out / f"width-{hidden}" / "train"
    check.command([sys.executable, "-m", "full_model.train", *dims(plan, hidden), *step_flags(plan),
                   "--steps", str(plan.steps), "--warmup-steps", str(plan.warmup_steps), "--ranks", "1",
                   "--device", plan.device, "--timeout-s", check.group_timeout_s, "--quiet", "--out", str(d)], d)
    m = measured_from_run(d)
    return {"train": str(d), "measured_ms": m.median_s * 1e3, "measured_min_ms": m.spread_s["min"] * 1e3,
            "measured_max_ms": m.spread_s["max"] * 1e3, "num_iterations": len(m.step_times_s),
            "warmup_steps": m.warmup, "measured_breakdown_s": m.timers_s}


def width_prediction(check: Check, hidden: int, profile: list[Path], train: str | None) -> dict[str, Any]:
    """The prediction from this width's probe rows, after checking that the compute probes (and
    the step, where it ran) measured the width's shapes; the host run is narrowed by design."""
    plan, d = check.plan, check.out / f"width-{hidden}" / "predict"
    shaped = [p for p in profile if not p.name.startswith("host")] + ([Path(train)] if train else [])
    check_profile_matches(width_config(plan, hidden), shaped)
    res = check.command([sys.executable, "-m", "analysis.predict", *dims(plan, hidden), *step_flags(plan),
                         "--system", plan.system, "--profile", *map(str, profile), "--json"], d)
    pred = json.loads(res.stdout.strip().splitlines()[-1])
    step_s = pred["step_time_s"]
    top = sorted(pred["breakdown_s"].items(), key=lambda kv: -kv[1])[:TOP_COMPONENTS]
    by_word = pred["seconds_by_provenance"]
    return {"predicted_ms": step_s * 1e3, "bound": {ph: v["bound"] for ph, v in pred["phases"].items()},
            "top_components": [{"component": k, "seconds": v, "share": v / step_s} for k, v in top if v > 0],
            "provenance_pct": {w: 100.0 * t / step_s for w, t in by_word.items()},
            "phases": pred["phases"], "breakdown_s": pred["breakdown_s"], "sources": pred["sources"],
            "seconds_by_provenance": by_word, "notes": pred.get("notes", [])}


def run_width(check: Check, hidden: int, host_runs: dict[str, Path]) -> dict[str, Any] | None:
    """One line of the table: what was measured is kept when a later step fails."""
    profile = check.run(f"probes-{hidden}", width_probes, check, hidden, host_runs)
    measured = check.run(f"train-{hidden}", width_step, check, hidden)
    pred = None
    if profile:
        pred = check.run(f"predict-{hidden}", width_prediction, check, hidden, profile,
                         measured and measured["train"])
    else:
        check.skip(f"predict-{hidden}", "the time limit was reached earlier" if check.stopped else
                   f"probes-{hidden} did not finish")
    if not (profile or measured or pred):
        return None
    row: dict[str, Any] = {"hidden": hidden, "flags": [*dims(check.plan, hidden), *step_flags(check.plan)],
                           "profile": [str(p) for p in profile or ()], **(measured or {}), **(pred or {})}
    if measured and pred:
        row["error_pct"] = 100.0 * (pred["predicted_ms"] - measured["measured_ms"]) / measured["measured_ms"]
    return row


def run_check(plan: Plan, out: Path, argv: Sequence[str]) -> dict[str, Any]:
    t0, start = time.monotonic(), _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(plan=plan, out=out, deadline=t0 + plan.time_limit_s)
    probes = {"alcf-1t": check.run("probes-1t", campaign, check, "gemm,attention,layer_ops", "probes-1t"),
              "host": check.run("host-1t", campaign, check, "host", "host-1t")}
    host_runs: dict[str, Path] = {}
    widths = [row for w in plan.widths if (row := run_width(check, w, host_runs)) is not None]
    failed = [s["name"] for s in check.steps if s["status"] in ("failed", "stopped")]
    return {"command": [sys.executable, "-m", MODULE, *argv], "out": str(out),
            "status": "stopped" if check.stopped else ("failed" if failed else "ok"), "failed_steps": failed,
            "not_run": [s["name"] for s in check.steps if s["status"] == "not run"],
            "stopped": check.stopped, "machine": machine_info(out, plan.device),
            "plan": {**dataclasses.asdict(plan), "system": plan.system}, "probes": probes,
            "widths": widths, "steps": check.steps, "start_time": start,
            "end_time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    try:
        plan, out = validate(a)
    except UsageError as e:
        print(f"error: {MODULE}: {e}", file=sys.stderr)
        return 2
    print(f"# device check on {plan.device}: widths {', '.join(map(str, plan.widths))}, limit "
          f"{plan.time_limit_s:g} s → {out}", file=sys.stderr, flush=True)
    try:
        with raise_on_terminate():
            doc = run_check(plan, out, argv)
    except KeyboardInterrupt as e:
        return interrupted_exit(MODULE, e, f"every child ended; the steps' logs are under {out}")
    write_outputs(out, doc)
    print(format_table(doc))
    print(json.dumps({k: doc[k] for k in ("status", "failed_steps", "stopped", "out", "seconds")}
                     | {"widths": [{k: r.get(k) for k in ("hidden", "measured_ms", "predicted_ms", "error_pct", "bound")}
                                   for r in doc["widths"]]}))
    return 0 if doc["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
