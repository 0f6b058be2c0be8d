"""Calibration: recovers a known knob from synthetic step times; vTrain data when present."""
import csv
from pathlib import Path

import pytest

from analysis.calibrate import Case, calibrate, errors, main, read_cases, summary
from analysis.predict import predict
from analysis.profile import SpecProfile
from microbench.config import preset, with_layout

VTRAIN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "vtrain_ground_truth_multi.csv"


def test_recovers_gemm_efficiency_from_synthetic_times():
    truth = SpecProfile.from_yaml("dgx-h100").with_knobs({"efficiency.gemm_max": 0.55})
    cfgs = [with_layout(preset("llama2-7b"), tp=tp, dp=8 // tp, micro_batch=1, global_batch=16) for tp in (1, 2, 4)]
    cases = [Case(c, predict(c, truth).step_time_s) for c in cfgs]
    start = SpecProfile.from_yaml("dgx-h100")
    fitted, knobs, rep = calibrate(start, cases, knobs=(("efficiency.gemm_max", 0.2, 0.9),), max_evals=60)
    assert knobs["efficiency.gemm_max"] == pytest.approx(0.55, abs=0.01)
    assert rep["after"]["mape"] < 0.005 < rep["before"]["mape"]


def test_reads_project_csv_and_reports(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layers", "hidden", "heads", "ffn", "seq", "vocab", "tp", "pp", "dp", "mbs", "gbs", "step_time_s"])
        w.writerow([4, 1024, 16, 4096, 1024, 32000, 2, 1, 4, 1, 8, 0.05])
        w.writerow([4, 1024, 16, 4096, 1024, 32000, 1, 2, 4, 1, 16, 0.09])
    cases = read_cases(path)
    assert len(cases) == 2 and cases[0].cfg.parallel.recompute == "full"
    assert main(["--system", "dgx-a100-80gb", "--data", str(path), "--max-evals", "20"]) == 0
    out = capsys.readouterr().out
    assert "before: MAPE" in out and "after:  MAPE" in out


def test_bad_csv(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("layers,hidden\n4,1024\n")
    assert main(["--system", "dgx-a100-80gb", "--data", str(path)]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main(["--system", "dgx-a100-80gb", "--data", str(tmp_path / "none.csv")]) == 2


@pytest.mark.skipif(not VTRAIN.is_file(), reason="../shared/validation absent")
@pytest.mark.parametrize("system", ["dgx-a100-80gb", "dgx-a100-40gb"])
def test_committed_a100_calibration_within_10_percent_on_vtrain(system):
    cases = read_cases(VTRAIN)
    assert len(cases) == 109
    s = summary(errors(SpecProfile.from_yaml(system), cases))
    assert s["mape"] <= 0.10
