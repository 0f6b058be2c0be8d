"""The device check's report: what the probe runs measured, the machine, the table, the CSV and
JSON files (:mod:`benchmarks.device_check` runs the steps)."""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from microbench.runtime.results import read_run, usable_cores


def summarise_probes(run_dir: Path) -> dict[str, Any]:
    """The rates a device check reads first, from a run's rows (peak GEMM and copy, layer GEMMs,
    attention, host µs per phase)."""
    manifest, rows = read_run(run_dir)
    ok = [r for r in rows if r.get("status") == "ok"]

    def rates(kind: str, col: str, *, peak: bool) -> list[float]:
        return [r[col] for r in ok if r.get("kind") == kind and r.get(col) is not None
                and (r.get("op") in ("peak", "copy")) == peak]
    out: dict[str, Any] = {"dir": str(run_dir), "rows_ok": len(ok), "rows": len(rows),
                           "compute_scale": manifest.get("compute_scale")}
    for key, vals in (("peak_gemm_tflops", rates("gemm", "tflops", peak=True)),
                      ("layer_gemm_tflops_max", rates("gemm", "tflops", peak=False)),
                      ("attention_tflops_max", rates("attention", "tflops", peak=False)),
                      ("peak_copy_gbps", [r["gbps"] for r in ok if r.get("op") == "copy" and r.get("gbps")])):
        if vals:
            out[key] = max(vals)
    host = {f"{r.get('path')}/{r['phase']}": r["host_us"] for r in ok if r.get("kind") == "host"}
    if host:
        out["host_us"] = host
    return out


def machine_info(out: Path, device: str) -> dict[str, Any]:
    """The device as the first probe run saw it (its manifest), the CPU, and the driver."""
    info: dict[str, Any] = {"device": device, "hostname": platform.node(), "cpu_cores": os.cpu_count(),
                            "cpu_cores_usable": usable_cores(),
                            "cpu_model": cpu_model()}
    for name in ("probes-1t", "host-1t"):
        try:
            manifest, _ = read_run(out / name)
        except (ValueError, OSError):
            continue
        info.update(device_name=manifest.get("device_name"), devices=manifest.get("devices"),
                    versions=manifest.get("versions"))
        break
    if device == "cuda" and shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = res.stdout.strip().splitlines() if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    if "versions" not in info:
        import torch
        info["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _num(r: dict[str, Any], key: str, fmt: str, unit: str = "") -> str:
    return f"{r[key]:{fmt}}{unit}" if key in r else "n/a"


def _bound(r: dict[str, Any]) -> str:
    return " ".join(f"{ph}:{b}" for ph, b in r.get("bound", {}).items()) or "n/a"


def format_table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"device check: {m['device']} ({m.get('device_name')}; CPU {m['cpu_model']}, {m['cpu_cores']} cores; "
             f"torch {(m.get('versions') or {}).get('torch')}); spec {doc['plan']['system']} for what no probe measured",
             f"{'hidden':>7}{'measured ms':>13}{'[min, max]':>20}{'predicted ms':>14}{'error':>9}  "
             f"{'bound':<22}{'measured':>9}  top components (predicted)"]
    for r in doc["widths"]:
        rng = f"[{r['measured_min_ms']:.2f}, {r['measured_max_ms']:.2f}]" if "measured_ms" in r else "n/a"
        top = ", ".join(f"{c['component']} {c['share']:.0%}" for c in r.get("top_components", ()))
        share = f"{r['provenance_pct'].get('measured', 0):.0f}%" if "provenance_pct" in r else "n/a"
        lines.append(f"{r['hidden']:>7}{_num(r, 'measured_ms', '.2f'):>13}{rng:>20}{_num(r, 'predicted_ms', '.2f'):>14}"
                     f"{_num(r, 'error_pct', '+.1f', '%'):>9}  {_bound(r):<22}{share:>9}  {top}")
    lines.append("measured = median step after the warm-up; error = (predicted − measured) / measured; bound = "
                 "which of host or device bounds each phase (prediction, from the probes); measured % = share "
                 "of the predicted step priced by this machine's probe rows")
    lines += [f"{s['status']}: {s['name']}: {s['reason']}" for s in doc["steps"] if s["status"] in ("failed", "stopped")]
    why: dict[str, list[str]] = {}
    for s in doc["steps"]:
        if s["status"] == "not run":
            why.setdefault(s["reason"], []).append(s["name"])
    lines += [f"not run ({reason}): {', '.join(names)}" for reason, names in why.items()]
    return "\n".join(lines)


CSV_FIELDS = ("hidden", "measured_ms", "measured_min_ms", "measured_max_ms", "num_iterations", "predicted_ms",
              "error_pct", "bound", "measured_pct", "extrapolated_pct", "specified_pct", "top_components")


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    with open(out / "device_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in doc["widths"]:
            pct = r.get("provenance_pct")
            w.writerow({**{k: r[k] for k in CSV_FIELDS if k in r}, "bound": _bound(r) if "bound" in r else "",
                        **{f"{word}_pct": round(pct.get(word, 0.0), 2) if pct else ""
                           for word in ("measured", "extrapolated", "specified")},
                        "top_components": "; ".join(f"{c['component']} {c['seconds'] * 1e3:.3f} ms"
                                                    for c in r.get("top_components", ()))})
    (out / "device_check.json").write_text(json.dumps(doc, indent=1) + "\n")
