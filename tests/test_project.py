"""Projection across node counts and layout search."""
import json

from analysis.predict import predict
from analysis.spec import SpecProfile
from analysis.project import layouts, main, project, search
from microbench.model.config import preset


def test_projection_grows_dp_and_fom():
    cfg, prof = preset("alcf-1t"), SpecProfile.from_yaml("aurora")
    rows = project(cfg, prof, [64, 128, 10624], tokens=1e12)
    assert [r["dp"] for r in rows] == [1, 2, 166]
    assert rows[0]["step_time_s"] == predict(cfg, prof).step_time_s
    assert rows[0]["fom"] < rows[1]["fom"] < rows[2]["fom"]
    assert rows[2]["time_to_train_days"] < rows[0]["time_to_train_days"]
    assert "error" in project(cfg, prof, [1])[0]


def test_layouts_are_valid_and_search_ranks_fitting_ones():
    cfg, prof = preset("llama2-7b"), SpecProfile.from_yaml("dgx-a100-80gb")
    all_ = list(layouts(cfg, world=16, ranks_per_node=8))
    assert all(c.parallel.world_size == 16 and c.parallel.tp <= 8 for c in all_)
    assert len({(c.parallel.tp, c.parallel.pp) for c in all_}) > 4
    best, n = search(cfg, prof, nodes=2, top=5)
    assert n == len(all_) and len(best) == 5
    times = [p.step_time_s for p in best]
    assert times == sorted(times) and all(p.fits_in_memory for p in best)


def test_cli(capsys):
    assert main(["--model", "alcf-1t", "--system", "aurora", "--search", "--nodes", "64", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "valid layouts" in out and " 1 tp" in out
    assert main(["--model", "alcf-1t", "--system", "aurora", "--nodes", "64", "10624", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["nodes"] for r in d["rows"]] == [64, 10624]
    assert main(["--model", "alcf-1t", "--system", "aurora", "--search"]) == 2
    assert capsys.readouterr().err.startswith("error: --search needs one")
