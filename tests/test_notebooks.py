"""Every analysis notebook executes, top to bottom, against a small run this module makes.

The run comes from the main job (``python -m microbench --model tiny --quick``) when
``microbench/__main__.py`` exists, else from individual probes (allreduce sweep, tiny GEMMs)
into one folder; notebooks read it through ``MICROBENCH_RUN_DIR``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "analysis" / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}


def _run(args: list[str], *, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("nbrun")
    if (ROOT / "microbench" / "__main__.py").is_file():
        out = base / "campaign"
        r = _run(["microbench", "--model", "tiny", "--quick", "--out", str(out)])
        if r.returncode == 0 and (out / "manifest.json").is_file():
            return out
        warnings.warn(f"python -m microbench failed (rc {r.returncode}); using single probes: "
                      f"{r.stderr.strip().splitlines()[-1:] or r.stdout[-200:]}")
    out = base / "probes"
    r = _run(["microbench.allreduce", "-b", "1K", "-e", "256K", "-f", "4", "-n", "3", "-w", "1",
              "--out", str(out / "allreduce")])
    assert r.returncode == 0, r.stderr[-2000:]
    if (ROOT / "microbench" / "gemm.py").is_file():
        r = _run(["microbench.gemm", "--model", "tiny", "-n", "2", "-w", "1", "--out", str(out / "gemm")])
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_notebooks_exist_and_have_no_outputs():
    assert {p.stem for p in NOTEBOOKS} >= {"collectives", "gemms", "prediction", "crosscheck"}
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p.name
        assert any(c.cell_type == "markdown" for c in nb.cells), p.name
        src = "".join(c.source for c in nb.cells)
        assert "MICROBENCH_RUN_DIR" in src and "analysis.load" in src, p.name


@pytest.mark.multirank
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, small_run, monkeypatch):
    monkeypatch.setenv("MICROBENCH_RUN_DIR", str(small_run))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for var in ("MICROBENCH_MODEL", "MICROBENCH_SYSTEM", "MICROBENCH_MEGATRON_LOG"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, json.dumps(errors)[:2000]
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
