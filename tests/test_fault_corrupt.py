"""Every check, end to end: ``MICROBENCH_FAULT=corrupt:1:…`` perturbs rank 1's result after
the checked call; each probe's check must count it, and the case must be ``failed``."""
from __future__ import annotations

import json

import pytest
import torch
from types import SimpleNamespace

from tests.launch import run_local

PROBES = {  # small: seconds on a CPU; attention and layer_ops at the alcf-1t shapes in bf16,
    # scaled (s = 256 for attention; 128 rows of every layer op, inner dimensions unscaled)
    "gemm": ["--shape", "64,96,128", "--no-peak", "-d", "fp32"],
    "attention": ["--model", "alcf-1t", "--tp", "12", "--scale", "0.125", "--no-peak", "-d", "bf16"],
    "layer_ops": ["--model", "alcf-1t", "--tp", "12", "--scale", "0.0625", "--no-peak", "-d", "bf16",
                  "--adam-max-params", "65536"],
    "allreduce": ["-b", "4K", "-e", "4K", "-d", "bf16"],
    "allgather": ["-b", "4K", "-e", "4K", "--place", "out"],
    "reduce_scatter": ["-b", "4K", "-e", "4K", "--place", "in"],
    "alltoall": ["-b", "4K", "-e", "4K"],
    "sendrecv": ["--pp", "2", "-b", "4K", "-e", "4K"],
    "host": ["--model", "tiny", "--tp", "2", "-d", "fp32"],
}
MODES = ("scale=0.99", "nan", "zero")
# Each probe once end to end on 2 ranks (a run costs ~30 s on a loaded 2-core machine), the
# three modes spread over them; every probe × mode is covered in-process below. attention and
# layer_ops take the hardest one: a 1 % error in bf16 (tests/test_checks.py has the margins).
E2E = {"gemm": "scale=0.99", "attention": "scale=0.99", "layer_ops": "scale=0.99", "allreduce": "nan",
       "allgather": "scale=0.99", "reduce_scatter": "zero", "alltoall": "scale=0.99",
       "sendrecv": "nan", "host": "scale=0.99"}


def _rows(path):
    return [json.loads(line) for line in (path / "rows.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.multirank
@pytest.mark.parametrize("probe, mode", list(E2E.items()))
def test_corrupted_result_fails_the_case(tmp_path, probe, mode):
    out = tmp_path / "run"
    res = run_local(f"microbench.{probe}", *PROBES[probe], "-n", "1", "-w", "0", "--out", str(out),
                    ranks=2, timeout=150, MICROBENCH_FAULT=f"corrupt:1:{mode}")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]  # nccl-tests: wrong → 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    rows = [r for r in _rows(out) if "num_wrong" in r]
    assert rows, res.stdout[-2000:] + res.stderr[-2000:]
    for r in rows:
        assert r["status"] == "failed" and r["num_wrong"] > 0, (r["case"], r.get("reason"))
        assert "rank 1:" in r["reason"] and "rank 0:" not in r["reason"], r["reason"]
        assert f"{r['num_wrong']} of {r['num_checked']} elements wrong" in r["reason"]
    if mode == "nan":  # one NaN per result tensor of rank 1, nothing else touched
        assert all(r["num_wrong"] <= 3 for r in rows), [(r["case"], r["num_wrong"]) for r in rows]
    if probe in COMPUTE_CASES:  # every case was checked, and failed
        assert len(rows) == len(_rows(out)) == COMPUTE_CASES[probe], [r["case"] for r in _rows(out)]


COMPUTE_CASES = {"attention": 4, "layer_ops": 14, "host": 5}  # alcf-1t: 2 paths × fwd, bwd; 13 memops + adamw;
# the host probe on tiny at TP 2 (no recompute): 2 attention paths × fwd, bwd, and the TP call


@pytest.mark.multirank
@pytest.mark.parametrize("probe", list(COMPUTE_CASES))
def test_clean_bf16_run_at_alcf_1t_shapes_has_no_wrong_element(tmp_path, probe):
    out = tmp_path / "run"
    res = run_local(f"microbench.{probe}", *PROBES[probe], "-n", "1", "-w", "0", "--out", str(out),
                    ranks=2, timeout=150)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == COMPUTE_CASES[probe]
    assert all(r["status"] == "ok" and r["num_wrong"] == 0 and r["num_checked"] > 0 for r in rows), rows


# -- every probe's check × every mode, in-process (no ranks) ----------------------------------

def _compute_works():
    from microbench.attention import attention_shapes, attention_work
    from microbench.model.config import tiny
    from microbench.gemm import gemm_work
    from microbench.layer_ops import (adamw_shape, adamw_work, fresh_copy_shapes, fresh_copy_work, memop_shapes,
                                      memop_work)
    from microbench.model.config import with_layout
    cfg = tiny()
    m = cfg.model
    ops = {s["op"]: s for s in memop_shapes(cfg) if s["phase"] == "fwd"}
    extra = {"norm": m.norm, "head_dim": m.head_dim, "vocab_shard": m.vocab_size, "dtype": "fp32"}
    return {
        "gemm": lambda: gemm_work({"m": 64, "n": 96, "k": 128, "dtype": "fp32", "layout": "NT"},
                                  seed=2, device="cpu"),
        "attention-fwd": lambda: attention_work({**attention_shapes(cfg)[0], "path": "fused",
                                                 "dtype": "fp32"}, seed=2, device="cpu"),
        "attention-bwd": lambda: attention_work({**attention_shapes(cfg)[1], "path": "explicit",
                                                 "dtype": "fp32"}, seed=2, device="cpu"),
        "layer_ops-norm": lambda: memop_work({**ops["norm"], **extra}, seed=2, device="cpu"),
        "layer_ops-adamw": lambda: adamw_work({**adamw_shape(cfg, max_params=4096), "dtype": "fp32"},
                                              seed=2, device="cpu"),
        "layer_ops-copy_fresh": lambda: fresh_copy_work(
            fresh_copy_shapes(with_layout(cfg, dp=2, zero_stage=1), device_kind="cpu")[0], seed=2, device="cpu"),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(_compute_works()))
def test_every_compute_check_catches_every_corruption(monkeypatch, name, mode):
    from microbench.harness.compute import ComputeProbe
    from microbench.harness.faults import corruption as _corruption
    work = _compute_works()[name]()
    work.run()
    assert work.check()[0] == 0
    monkeypatch.setenv("MICROBENCH_FAULT", f"corrupt:0:{mode}")
    _corruption(0)(ComputeProbe().result(None, None, work))
    wrong, checked = work.check()
    assert wrong > 0 and (mode != "zero" or wrong > checked // 2), (wrong, checked)


def _collective(probe_name: str, *, rank: int, n: int = 2, count: int = 64, dtype: str = "bf16"):
    """A probe, its case for ``rank`` of an ``n``-rank group, and the state a correct
    collective leaves (built by hand from every rank's pattern)."""
    import importlib

    from microbench.harness.collective import pattern
    from microbench.harness.contract import Case, Context
    mod = importlib.import_module(f"microbench.{probe_name}")
    probe = next(v() for k, v in vars(mod).items() if isinstance(v, type) and getattr(v, "module", "") == f"microbench.{probe_name}")
    ctx = Context(args=None, world=SimpleNamespace(rank=rank, device="cpu"), cfg=None, grid=None)
    fill = [pattern(count, rank=r, seed=2, dtype=dtype, device="cpu", summands=n) for r in range(n)]
    move = [pattern(count, rank=r, seed=2, dtype=dtype, device="cpu") for r in range(n)]
    chunk = count // n
    if probe_name == "sendrecv":  # rank 1 received rank 0's activation
        case = Case("c", {"count": count, "dtype": dtype}, group_ranks=[0, 1])
        return probe, ctx, case, {"seed": 2, "act_in": move[0].clone(), "act_from": 0}
    case = Case("c", {"count": count, "dtype": dtype}, group_ranks=list(range(n)))
    recv = {"allreduce": lambda: sum(f.double() for f in fill).to(fill[0].dtype),
            "allgather": lambda: torch.cat([m[:chunk] for m in move]),
            "reduce_scatter": lambda: sum(f[rank * chunk:(rank + 1) * chunk].double() for f in fill).to(fill[0].dtype),
            "alltoall": lambda: torch.cat([m[rank * chunk:(rank + 1) * chunk] for m in move])}[probe_name]()
    return probe, ctx, case, {"seed": 2, "recv": recv}


COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "sendrecv")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", COLLECTIVES)
def test_every_collective_check_catches_every_corruption(monkeypatch, name, mode):
    from microbench.harness.faults import corruption as _corruption
    probe, ctx, case, state = _collective(name, rank=1)
    assert probe.check(ctx, case, state) == (0, case.fields["count"] // (2 if name == "reduce_scatter" else 1))
    monkeypatch.setenv("MICROBENCH_FAULT", f"corrupt:1:{mode}")
    _corruption(1)(probe.result(ctx, case, state))
    wrong, checked = probe.check(ctx, case, state)
    assert wrong == {"nan": 1}.get(mode, checked), (wrong, checked)  # exact: every element moves


def test_allreduce_check_at_768_ranks_in_bf16_catches_zero():
    """The case the old tolerance let through: 768 ranks, bf16, an all-zero result."""
    probe, ctx, case, state = _collective("allreduce", rank=5, n=768, count=256)
    assert probe.check(ctx, case, state) == (0, 256)
    state["recv"].zero_()
    assert probe.check(ctx, case, state) == (256, 256)


@pytest.mark.multirank
def test_no_fault_no_failed_row(tmp_path):
    out = tmp_path / "run"
    res = run_local("microbench.allreduce", *PROBES["allreduce"], "-n", "1", "-w", "0",
                    "--out", str(out), ranks=2, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _rows(out)
    assert rows and all(r["status"] == "ok" and r["num_wrong"] == 0 for r in rows)
    assert all(r["num_checked"] == 2 * r["count"] for r in rows)  # both ranks checked all


@pytest.mark.parametrize("spec", ["corrupt:1:scale", "corrupt:1:nan=2", "corrupt:x:zero", "1:2:explode"])
def test_malformed_fault_spec_is_a_usage_error(spec):
    res = run_local("microbench.allreduce", "-b", "1K", "-e", "1K", ranks=2, timeout=60,
                    MICROBENCH_FAULT=spec)
    assert res.returncode == 2 and "MICROBENCH_FAULT" in res.stderr.splitlines()[0], res.stderr
