"""Provenance, one fit, recorded clamps, refused failed and NaN rows (issue 10).

Rows are synthetic and follow microbench/results.py's columns; expected values are computed
by hand from the numbers written into the rows, not by the code under test.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import plots  # noqa: E402
from analysis.predict import predict  # noqa: E402
from analysis.measured import MeasuredProfile
from analysis.placement import Placement
from analysis.spec import SpecProfile
from microbench.model.vocabulary import word_of  # noqa: E402
from microbench.model.config import preset, with_layout  # noqa: E402
from microbench.runtime.results import RunWriter  # noqa: E402
from microbench.model.workload import Collective, Gemm, workload

INTRA = Placement(False, 2, 1, 1)  # one group of two ranks inside a node

ROOT = Path(__file__).resolve().parents[1]
SIZES = [1 << k for k in range(12, 25, 2)]  # 4 KiB … 16 MiB


def sweep(*, n: int = 2, kind: str = "allreduce", alpha_us: float = 50.0, us_per_byte: float = 1 / 500):
    """A sweep whose per-iteration *mean* is exactly α + β·S, and whose median is not
    (a third of it): a fit of the median would find another α and β."""
    rows = []
    for s in SIZES:
        mean = alpha_us + us_per_byte * s
        rows.append({"probe": kind, "case": f"{kind}-{s}", "kind": kind, "op": kind, "axis": "tp",
                     "group_size": n, "num_groups": 1, "crosses_nodes": False, "in_place": False,
                     "size_bytes": s, "dtype": "bf16", "time_us": mean / 3, "time_us_median": mean / 3,
                     "time_us_mean": mean, "status": "ok", "num_wrong": 0})
    return rows


def test_the_report_draws_the_fit_the_predictor_prices():
    df = pd.DataFrame(sweep())
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    fit = prof.collective_fits[("allreduce", 2, False)][0]
    assert fit.alpha_s == pytest.approx(50e-6, rel=1e-6)          # α of the means, by construction
    assert fit.beta_s_per_byte == pytest.approx(1e-6 / 500, rel=1e-6)
    drawn = plots.collective_fits(df, "allreduce")
    assert len(drawn) == 1
    assert drawn["alpha_us"].iat[0] == pytest.approx(50.0, rel=1e-6)  # the same α, not the median's 16.7


def test_a_derived_row_never_enters_a_fit():
    rows = sweep()
    # the DP probe's whole-step row: 4 of 20 buckets measured, × 5; far off the line
    rows.append({"probe": "dp_allreduce", "case": "dp_sync_step", "op": "dp_sync_step", "kind": "allreduce",
                 "axis": "dp", "group_size": 2, "num_groups": 1, "crosses_nodes": False,
                 "size_bytes": 5 * (1 << 24), "time_us": 1e9, "time_us_measured": 2e8, "extrapolated": True,
                 "status": "ok"})
    df = pd.DataFrame(rows)
    fit = MeasuredProfile.from_rows(df, fallback="aurora").collective_fits[("allreduce", 2, False)][0]
    assert fit.alpha_s == pytest.approx(50e-6, rel=1e-6) and fit.n == len(SIZES)
    assert plots.collective_fits(df, "allreduce")["num_points"].tolist() == [len(SIZES)]


def test_a_tp12_allreduce_from_a_2_rank_fit_is_extrapolated_by_bus_factor():
    prof = MeasuredProfile.from_rows(pd.DataFrame(sweep()), fallback="aurora")
    c = Collective("tp_allreduce", "allreduce", "tp", 1 << 20, "bf16", 1, "fwd", 12)
    # bus factor 2·11/12 for n = 12 over 2·1/2 for n = 2: the bandwidth term × 11/6
    want = 50e-6 + (1e-6 / 500) * c.bytes * 11 / 6
    assert prof.collective(c, INTRA).seconds == pytest.approx(want, rel=1e-6)
    src = prof.collective(c, INTRA).source
    assert src.startswith("extrapolated (allreduce group size 2 → 12 by bus factor")
    same = Collective("tp_allreduce", "allreduce", "tp", 1 << 20, "bf16", 1, "fwd", 2)
    assert word_of(prof.collective(same, INTRA).source) == "measured"
    bigger = Collective("tp_allreduce", "allreduce", "tp", 1 << 30, "bf16", 1, "fwd", 2)
    assert prof.collective(bigger, INTRA).source.startswith("extrapolated (α–β fit of allreduce n=2")


def _gemm_rows(shapes, *, tflops: float, scale: float, peak_tflops: float):
    rows = [{"probe": "gemm", "case": f"g{m}x{n}x{k}", "kind": "gemm", "op": "fc1", "phase": "fwd",
             "m": m, "n": n, "k": k, "batch": 1, "dtype": "bf16", "scale": scale,
             "time_us": 2 * m * n * k / (tflops * 1e6), "status": "ok", "num_wrong": 0,
             "run_peak_tflops": peak_tflops, "run_device_name": "x86_64"} for m, n, k in shapes]
    rows.append({"probe": "gemm", "case": "peak", "kind": "gemm", "op": "peak", "phase": "fwd", "m": 512,
                 "n": 512, "k": 512, "batch": 1, "dtype": "bf16", "scale": 1.0, "status": "ok",
                 "time_us": 2 * 512 ** 3 / (peak_tflops * 1e6), "num_wrong": 0,
                 "run_peak_tflops": peak_tflops, "run_device_name": "x86_64"})
    return pd.DataFrame(rows)


def test_a_scaled_down_gemm_is_extrapolated_and_says_the_scale():
    df = _gemm_rows([(128, 1024, 1536), (128, 1536, 1024)], tflops=1e-3, scale=0.0625, peak_tflops=2e-3)
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    g = Gemm("fc1", "fwd", 2048, 16384, 24576)
    src = prof.gemm(g).source
    assert src.startswith("extrapolated (2 nearest of 2 measured bf16 GEMM shapes (scale 1/16 → 1)")
    assert word_of(prof.gemm(Gemm("fc1", "fwd", 128, 1024, 1536)).source) == "measured"


def test_the_gemm_ceiling_is_the_fastest_gemm_measured_not_a_slower_peak():
    # Layer GEMMs ran at 0.1 TFLOP/s, the small square "peak" only at 0.05: a big shape the
    # spec model rates higher must not be priced slower than what was measured (the old
    # clamp to the peak did), and a rate beyond every measurement is clamped and says so.
    df = _gemm_rows([(64, 64, 64), (64, 128, 64)], tflops=0.1, scale=1.0, peak_tflops=0.05)
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    g = Gemm("fc1", "fwd", 4096, 4096, 4096)
    rate = g.flop / prof.gemm(g).seconds / 1e12
    assert rate == pytest.approx(0.1, rel=1e-9)
    assert "clamped to the fastest measured 0.1 TFLOP/s" in prof.gemm(g).source


def test_an_overlap_fraction_outside_0_1_is_clamped_and_says_so():
    df = pd.DataFrame([{"probe": "overlap", "case": "o", "kind": "overlap", "op": "overlap", "axis": "dp",
                        "time_us": 10.0, "status": "ok", "extra": {"exposed_fraction": 1.07}}])
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    assert prof.overlap("dp").seconds == 1.0
    assert prof.overlap("dp").source == ("measured (exposed fraction 1.07 clamped to 1: the probe's noise "
                                         "put it outside [0, 1])")


def test_a_nan_time_is_refused_not_dropped():
    rows = sweep()
    rows[2]["time_us_mean"] = float("nan")
    rows[2]["time_us"] = rows[2]["time_us_median"] = float("nan")
    with pytest.raises(ValueError, match=r"1 ok row\(s\) without a finite time.*allreduce-65536"):
        MeasuredProfile.from_rows(pd.DataFrame(rows), fallback="aurora")


def test_rows_with_wrong_elements_are_refused_unless_left_out_on_request():
    rows = sweep()
    rows[0]["num_wrong"] = 3
    rows[1]["status"] = "failed"
    df = pd.DataFrame(rows)
    with pytest.raises(ValueError, match=r"2 failed row\(s\) \(1 with num_wrong > 0\).*--include-failed"):
        MeasuredProfile.from_rows(df, fallback="aurora")
    prof = MeasuredProfile.from_rows(df, fallback="aurora", include_failed=True)
    assert prof.collective_fits[("allreduce", 2, False)][0].n == len(SIZES) - 2
    assert prof.notes == ["left out 2 failed row(s) (1 with num_wrong > 0) (--include-failed)"]


def _run_dir(tmp_path: Path, rows) -> Path:
    d = tmp_path / "run"
    with RunWriter(d, {"probe": "campaign", "model": "tiny"}) as w:
        for r in rows:
            w.write_row(r)
    return d


def test_predict_with_a_profile_and_no_system_is_refused_naming_what_is_missing(tmp_path):
    run = _run_dir(tmp_path, sweep())
    res = subprocess.run([sys.executable, "-m", "analysis.predict", "--model", "tiny", "--profile", str(run)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: --profile measures collective.intra but not peak, memory, gemm, attention")
    assert "p2p.inter" in err and "give --system NAME" in err


def test_seconds_by_provenance_add_up_to_the_step_and_name_each_part():
    cfg = with_layout(preset("tiny"), tp=2, dp=4)
    w = workload(cfg)
    spec = SpecProfile.from_yaml("aurora")
    rows = [{"probe": "gemm", "case": f"{g.name}-{g.phase}", "kind": "gemm", "op": g.name, "phase": g.phase,
             "m": g.m, "n": g.n, "k": g.k, "batch": g.batch, "dtype": g.dtype, "status": "ok",
             "time_us": 1e6 * spec.gemm(g).seconds} for g in w.gemms + w.head_gemms]
    pr = predict(cfg, MeasuredProfile.from_rows(pd.DataFrame(rows), fallback=spec))
    assert sum(pr.seconds_by_provenance.values()) == pytest.approx(pr.step_time_s, rel=1e-9)
    for comp, per in pr.provenance_s.items():
        assert sum(per.values()) == pytest.approx(pr.breakdown_s[comp], rel=1e-9)
    assert pr.sources["gemm"] == "measured"      # every layer GEMM at its own shape
    assert pr.sources["tp_comm"].startswith("specified (analysis/systems/aurora.yaml: network.intra.busbw_gbps")
    # the GEMM seconds are the measured ones: the spec's time, written into the rows
    assert pr.seconds_by_provenance["measured"] >= pr.breakdown_s["gemm"]
    assert all(word_of(s) in ("measured", "extrapolated", "specified") for s in pr.sources.values())


def test_mfu_of_an_unlisted_device_is_against_its_fastest_gemm():
    # the square "peak" ran at 0.05 TFLOP/s, a layer GEMM at 0.1: a peak below an achieved
    # rate would give an MFU above 100 %
    df = _gemm_rows([(64, 64, 64)], tflops=0.1, scale=1.0, peak_tflops=0.05)
    prof = MeasuredProfile.from_rows(df, fallback="aurora")
    assert prof.peak_tflops == pytest.approx(0.1, rel=1e-9)
    assert prof.sources()["peak"].startswith("measured (0.1 TFLOP/s, the fastest GEMM of the run, a layer GEMM")
