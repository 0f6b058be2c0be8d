"""The system spec schema: a wrong file is refused with one line naming file, line and key."""
from pathlib import Path

import pytest
import yaml

from analysis.errors import AnalysisError
from analysis.predict import main as predict_main
from analysis.spec import SpecProfile
from microbench.model.systems import SYSTEMS_DIR, shipped_systems
from microbench.model.devices import devices

AURORA = (SYSTEMS_DIR / "aurora.yaml").read_text()


def _variant(tmp_path: Path, old: str, new: str, name: str = "bad.yaml") -> Path:
    assert old in AURORA, old  # the edit must change something, or the test proves nothing
    p = tmp_path / name
    p.write_text(AURORA.replace(old, new, 1))
    return p


@pytest.mark.parametrize("old,new,key", [
    ("  gemm_max:", "  gem_max:", "efficiency.gem_max: unknown key (did you mean gemm_max?)"),
    ("busbw_gbps: 64.0", "busbw_gbps: -64.0", "network.intra.busbw_gbps: Input should be greater than 0"),
    ("  memop: 0.80", "  memop: 0", "efficiency.memop: Input should be greater than 0"),
    ("  memop: 0.80", "  memop: 1.2", "efficiency.memop: Input should be less than or equal to 1"),
    ("ranks_per_node: 12", "ranks_per_node: 0", "node.ranks_per_node: Input should be greater than or equal to 1"),
    ("gemm_tile: [256, 256]", "gemm_tile: [256, 0]", "efficiency.gemm_tile.1"),
    ("gemm_tile: [256, 256]", "gemm_tile: [256, 25.5]", "efficiency.gemm_tile.1"),
    ("ranks_per_node: 12", "ranks_per_node: '12'", "node.ranks_per_node: Input should be a valid integer"),
    ("      base_us: 30.0\n      per_step_us: 0.0\n      law: ring", "      base_us: -1\n      per_step_us: 0.0\n      law: ring",
     "network.intra.latency.base_us: Input should be greater than or equal to 0"),
    ("      law: ring", "      law: butterfly", "network.intra.latency.law: Input should be 'ring' or 'tree'"),
    ("  bwd_us: 1518.5", "  bwd_us: -5", "host.bwd_us: Input should be greater than or equal to 0"),
    ("  dp: 0.0", "  dp: 1.5", "overlap.dp"),
    # a bound above is not what stops these: .inf is > 0 and NaN fails no comparison
    ("busbw_gbps: 64.0", "busbw_gbps: .inf", "network.intra.busbw_gbps: Input should be a finite number"),
    ("  bwd_us: 1518.5", "  bwd_us: .nan", "host.bwd_us: Input should be a finite number"),
])
def test_a_bad_value_is_refused_naming_file_line_and_key(tmp_path, capsys, old, new, key):
    p = _variant(tmp_path, old, new)
    line = 1 + AURORA[:AURORA.index(old) + 1].count("\n") + old[:old.index(":")].count("\n")
    assert predict_main(["--model", "alcf-1t", "--system", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {p}:{line}: {key}"), err


def test_a_missing_knob_is_refused_not_defaulted(tmp_path):
    p = _variant(tmp_path, "  gemm_k_half: 128\n", "")
    with pytest.raises(AnalysisError, match=r"efficiency\.gemm_k_half: missing"):
        SpecProfile.from_yaml(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nnodes: 2\ndevice: {model: H200\n")
    with pytest.raises(AnalysisError) as e:
        SpecProfile.from_yaml(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:") and "YAML syntax error" in msg and "\n" not in msg


def test_a_knob_given_twice_is_refused_not_read_as_the_last(tmp_path):
    """PyYAML keeps the second of two equal keys without a word: the file would price with a
    value its reader does not see first. Both in range, so only the duplicate is wrong."""
    p = _variant(tmp_path, "  memop: ", "  memop: 0.3\n  memop: ")
    line = 1 + AURORA[:AURORA.index("  memop: ")].count("\n")
    with pytest.raises(AnalysisError) as e:
        SpecProfile.from_yaml(p)
    assert str(e.value) == (f"{p}:{line + 1}: YAML syntax error: duplicate key 'memop' (first given at line {line})")


@pytest.mark.parametrize("old, new, part", [
    ("  base_us: ", "  base_us: 1.0e+308 #", "network.intra.latency"),  # inside the range the schema allows
    ("  fwd_us: ", "  fwd_us: 1.0e+308 #", "host.fwd_us"),  # the step stays finite, its shares do not
    ("  memop: ", "  memop: 1.0e-300 #", "efficiency.memop"),
])
def test_a_figure_that_makes_the_prediction_infinite_is_refused(tmp_path, capsys, old, new, part):
    """Before, inf or NaN was printed as the prediction (or its provenance shares) with exit 0."""
    p = _variant(tmp_path, old, new)
    assert predict_main(["--model", "alcf-1t", "--system", str(p), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and part in err and "not a finite number" in err, err


def test_unknown_device_names_the_table(tmp_path):
    p = _variant(tmp_path, "model: Max-1550-tile", "model: Max-1551-tile")
    with pytest.raises(AnalysisError, match=r"device\.model: unknown device 'Max-1551-tile'.*Max-1550-tile"):
        SpecProfile.from_yaml(p)


def test_a_peak_is_stated_once():
    """No system file restates a device figure: they all come from microbench/model/devices.yaml."""
    for name in shipped_systems():
        raw = yaml.safe_load((SYSTEMS_DIR / f"{name}.yaml").read_text())
        assert set(raw["device"]) == {"model", "dtype"}, name
        p = SpecProfile.from_yaml(name)
        entry = devices()[raw["device"]["model"]]
        assert p.peak_tflops == entry["peak_tflops"][raw["device"]["dtype"]]
        assert (p.mem_bw_gbps, p.device_memory_gib, p.num_units) == \
            (entry["mem_bw_gbps"], entry["memory_gib"], entry["compute_units"])


def test_provenance_and_calibration_records_are_accepted_and_shown(tmp_path):
    p = tmp_path / "rec.yaml"
    assert AURORA.count("\nprovenance:\n") == 1 and "\ncalibration:" not in AURORA
    # into the file's own provenance block: a second `provenance:` would be a duplicate key
    p.write_text(AURORA.replace("\nprovenance:\n", "\nprovenance:\n  network.inter.nic_gbps: Slingshot-11, 200 Gb/s\n")
                 + "calibration: {date: 2026-11-30, mape_pct: 8.1}\n")
    prof = SpecProfile.from_yaml(p)
    src = prof.sources()["p2p.inter"]
    assert src.startswith(f"specified ({p}: network.inter.nic_gbps") and "Slingshot-11, 200 Gb/s" in src


def test_with_knobs_is_validated_and_knob_reads_back():
    p = SpecProfile.from_yaml("aurora")
    q = p.with_knobs({"efficiency.gemm_max": 0.5})
    assert q.gemm_max == 0.5 and p.gemm_max == 0.72
    with pytest.raises(AnalysisError, match="efficiency.gemm_max"):
        p.with_knobs({"efficiency.gemm_max": 0.0})
    with pytest.raises(AnalysisError, match="efficiency.gem_max: unknown key"):
        p.with_knobs({"efficiency.gem_max": 0.5})


def test_sources_name_file_and_key():
    s = SpecProfile.from_yaml("aurora").sources()
    assert s["p2p.inter"].startswith("specified (analysis/systems/aurora.yaml: network.inter.nic_gbps")
    assert s["peak"] == "specified (microbench/model/devices.yaml: Max-1550-tile.peak_tflops.bf16)"
    assert all(v.startswith("specified (") for v in s.values())
