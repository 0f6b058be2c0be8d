"""Writes the analysis notebooks (``python analysis/notebooks/make_notebooks.py``).

The .ipynb files are committed with empty outputs; this script is their source, so a change
to a notebook is a change here followed by a rerun. Every notebook reads its run directory
from ``MICROBENCH_RUN_DIR`` (default: the newest run under ``results/``) and loads rows
through :func:`analysis.load`, so ``tests/test_notebooks.py`` can point it at a small run.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os, sys
from pathlib import Path

def _repo_root() -> Path:
    """The checkout this notebook lives in (for `results/` and for imports without install)."""
    for p in [Path.cwd(), *Path.cwd().parents]:
        if (p / "pyproject.toml").is_file() and (p / "analysis").is_dir():
            return p
    return Path.cwd()

ROOT = _repo_root()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd
import matplotlib
%matplotlib inline
import analysis
from analysis import plots

def newest_run(root: Path) -> Path:
    runs = [m.parent for m in root.glob("*/manifest.json")]
    if not runs:
        raise FileNotFoundError(f"no run directory under {root}; run `python -m microbench` "
                                "or set MICROBENCH_RUN_DIR")
    return max(runs, key=lambda p: p.stat().st_mtime)

RUN_DIR = Path(os.environ.get("MICROBENCH_RUN_DIR") or newest_run(ROOT / "results"))
df = analysis.load(RUN_DIR)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 30)
print(f"{RUN_DIR}: {len(df)} rows from {df['run_dir'].nunique()} run(s); probes:",
      ", ".join(sorted(df["probe"].dropna().unique())))
df.groupby(["run_hostname", "run_device", "run_backend", "run_world_size"], dropna=False).size().rename("rows").to_frame()
'''

RUN_MD = ("**Which run.** The run directory comes from the environment variable `MICROBENCH_RUN_DIR` "
          "(a run directory, or a folder of several); without it, the newest run under `results/`. "
          "`analysis.load` returns one tidy DataFrame: one row per measured case, units in the column "
          "names, and `run_*` columns identifying the run (host, device, backend, world size).")


def collectives() -> list:
    return [
        new_markdown_cell(
            "# Collectives: bus bandwidth and the α–β model\n\n"
            "What this shows: for every collective the run measured (TP allreduce, allgather, "
            "reduce-scatter, pipeline send/recv, DP gradient allreduce), the **bus bandwidth** against "
            "message size, and the **α–β fit** t = α + β·S the predictor prices collectives with.\n\n"
            "Why bus bandwidth: nccl-tests' convention, so the numbers compare with any nccl-tests or "
            "oneCCL benchmark on the same machine. With S the full buffer, n the group size and "
            "algbw = S/t: busbw = algbw × 2(n−1)/n for allreduce, × (n−1)/n for allgather and "
            "reduce-scatter, × 1 for send/recv. A group of one rank has no bus bandwidth.\n\n" + RUN_MD),
        new_code_cell(SETUP),
        new_markdown_cell(
            "## The measured points\n\n"
            "`plots.collective_rows` keeps the rows with status `ok` over groups of more than one rank "
            "(out-of-place when a sweep has both). The pivot shows bus bandwidth (GB/s) by message size "
            "for every kind, mesh axis and group size — the table nccl-tests prints, per group."),
        new_code_cell(
            'c = plots.collective_rows(df)\n'
            'if c.empty:\n'
            '    print("this run has no collective rows over groups of more than one rank")\n'
            'else:\n'
            '    table = c.pivot_table(index="size_bytes", columns=["kind", "axis", "group_size"],\n'
            '                          values="busbw_gbps", aggfunc="median")\n'
            '    table.index = [plots.format_bytes(v) for v in table.index]\n'
            '    display(table.round(3))'),
        new_markdown_cell(
            "## α–β fits\n\n"
            "One fit per run and group (kind, axis, group size, concurrent groups, inter-node or not), "
            "by `analysis.fits.fit_alpha_beta`: least squares on relative error with α, β ≥ 0, so the "
            "small messages fix the latency α and the large ones the bandwidth. `fit_busbw_gbps` is the "
            "asymptotic bus bandwidth factor/β; a residual above ~20 % means the sweep crosses a protocol "
            "switch (or the machine was noisy) and one line describes it poorly. β = 0 (shown empty) "
            "means every size was latency-bound: sweep to larger sizes."),
        new_code_cell(
            'fits = plots.collective_fits(df)\n'
            'fits.drop(columns=["_fit"]) if len(fits) else "no fits: no collective rows"'),
        new_markdown_cell(
            "## Bus bandwidth vs message size\n\n"
            "One figure per collective kind: markers are measurements, dashed lines the fit drawn as "
            "busbw = factor·S / (α + β·S). Where the curve flattens the link is saturated; the size "
            "where it reaches half its asymptote is α/β (the *half-bandwidth point*): messages below "
            "it are latency-bound, which is why small TP allreduces cost more than their bytes suggest."),
        new_code_cell(
            'for kind in [k for k in analysis.fits.COLLECTIVE_KINDS if k in set(c.get("kind", []))]:\n'
            '    display(plots.busbw_vs_size(df, kind))'),
        new_markdown_cell(
            "## Half-bandwidth points\n\n"
            "α/β in bytes per group: the message size at which half the time is latency. Compare it with "
            "the workload's TP allreduce ([mbs·s, d] activation) to see which regime a step runs in."),
        new_code_cell(
            'if len(fits):\n'
            '    half = fits.assign(half_bw_bytes=[f.alpha_s / f.beta_s_per_byte if f.beta_s_per_byte > 0 else float("inf")\n'
            '                                      for f in fits["_fit"]])\n'
            '    display(half[["run", "kind", "axis", "group_size", "alpha_us", "fit_busbw_gbps", "half_bw_bytes"]])'),
    ]


def gemms() -> list:
    return [
        new_markdown_cell(
            "# GEMMs: achieved TFLOP/s against the peaks\n\n"
            "What this shows: every GEMM of one transformer layer (and the LM head) at the exact shapes "
            "one rank runs — forward, dgrad and wgrad of QKV, attention projection, FC1, FC2 — with its "
            "achieved rate 2·m·n·k·batch / t, as a fraction of the **measured peak** (a large square GEMM "
            "in the same dtype, probe `peak`) and of the **spec peak** where the device is known.\n\n"
            "Why: GEMMs are most of a step's time. The gap between a GEMM and the measured peak is shape "
            "efficiency (tile and wave quantization, small k), which a larger TP degree makes worse; the "
            "gap between measured and spec peak is what the device delivers at all. For Y = X·Wᵀ with "
            "T = mbs·s tokens: forward (m, n, k) = (T, out, in), dgrad (T, in, out), wgrad (out, in, T).\n\n"
            + RUN_MD),
        new_code_cell(SETUP),
        new_markdown_cell(
            "## The measured peak\n\n"
            "From the rows with `op == 'peak'` (the peak probe's square GEMM), the fastest per run and dtype."),
        new_code_cell(
            'ok = df[df["status"].fillna("ok") == "ok"]\n'
            'peak_rows = ok[(ok.get("op") == "peak") & (ok["kind"] == "gemm")] if "op" in ok else ok.iloc[0:0]\n'
            'peaks = peak_rows.groupby(["run_dir", "dtype"])["tflops"].max()\n'
            'peaks.rename("measured_peak_tflops").to_frame() if len(peaks) else "no peak row in this run"'),
        new_markdown_cell(
            "## Every workload GEMM\n\n"
            "`pct_peak` is of the measured peak (filled in here where the probe ran without its own), "
            "`pct_spec_peak` of the specification where the probe knew the device."),
        new_code_cell(
            'g = plots.gemm_table(df)\n'
            'if g.empty:\n'
            '    print("this run has no GEMM rows")\n'
            'else:\n'
            '    if len(peaks):\n'
            '        pk = peaks.groupby(level=0).max()\n'
            '        run_of = plots.gemm_rows(df)["run_dir"].reset_index(drop=True)\n'
            '        g["pct_measured_peak"] = 100 * g["tflops"] / run_of.map(pk)\n'
            '    display(g.sort_values("tflops").round(3))'),
        new_markdown_cell(
            "## Time-weighted rate per phase\n\n"
            "What the step actually gets: total FLOP over total time per phase (fwd, dgrad, wgrad), "
            "not the mean of the rates, so a slow large GEMM weighs as much as its time."),
        new_code_cell(
            'gr = plots.gemm_rows(df)\n'
            'if len(gr):\n'
            '    gr = gr.assign(t_s=plots.time_s(gr))\n'
            '    per = gr.groupby(["_run", "phase"]).agg(flop=("flop", "sum"), t_s=("t_s", "sum"))\n'
            '    per["tflops"] = per["flop"] / per["t_s"] / 1e12\n'
            '    display(per)'),
        new_markdown_cell(
            "## Plot\n\n"
            "Bars: achieved TFLOP/s per op and phase (one colour per run). Dashed: measured peak; "
            "dotted: spec peak (where a row carries `pct_spec_peak`)."),
        new_code_cell(
            'labels = plots.gemm_rows(df).drop_duplicates("_run").set_index("run_dir")["_run"] if len(gr) else {}\n'
            'mp = {labels[d]: v for d, v in peaks.groupby(level=0).max().items() if d in labels} if len(peaks) else {}\n'
            'sp = {}\n'
            'if len(gr) and "pct_spec_peak" in gr:\n'
            '    s = gr[gr["pct_spec_peak"].fillna(0) > 0]\n'
            '    sp = (s["tflops"] * 100 / s["pct_spec_peak"]).groupby(s["_run"]).median().to_dict()\n'
            'plots.gemm_tflops(df, measured_peak=mp, spec_peak=sp)'),
    ]


PRED_SETUP = '''\
from analysis.predict import predict, format_table
from analysis.measured import MeasuredProfile
from analysis.spec import SpecProfile
from analysis.project import project, default_nodes
from analysis.manifest import config_from_manifest
from microbench.model.config import preset
from microbench.runtime.results import read_run

manifest, _ = read_run(sorted(set(df["run_dir"]))[0])
SYSTEM = os.environ.get("MICROBENCH_SYSTEM") or manifest.get("system") or "aurora"
spec = SpecProfile.from_yaml(SYSTEM)
cfg = preset(os.environ["MICROBENCH_MODEL"]) if os.environ.get("MICROBENCH_MODEL") else \\
    (config_from_manifest(manifest) or preset("alcf-1t"))
measured = MeasuredProfile.from_rows(df, fallback=spec, name=f"measured {RUN_DIR.name}")
print(f"model {cfg.model.name}; system {spec.name}")
pd.Series(measured.sources(), name="source").to_frame()
'''


def prediction() -> list:
    return [
        new_markdown_cell(
            "# Step-time prediction and projection\n\n"
            "What this shows: the predicted time of one training step of the run's model (or "
            "`MICROBENCH_MODEL`), priced by a **measured profile** built from this run's rows, with a "
            "**spec profile** (`MICROBENCH_SYSTEM`, default the run's system or `aurora`) for whatever the "
            "run did not measure; its breakdown by component; the benchmark's own two-term model beside "
            "it; and the projection of step time and FOM to more nodes.\n\n"
            "Why: the project's method is *measure the components, then compose them*. The sources table "
            "says which parts were measured and which were specified — a prediction is only as measured "
            "as that table.\n\n" + RUN_MD),
        new_code_cell(SETUP),
        new_code_cell(PRED_SETUP),
        new_markdown_cell(
            "## The prediction\n\n"
            "Per pipeline stage and micro-batch: the layer's GEMMs, attention, memory-bound ops, exposed "
            "TP collectives and recompute, pipeline p2p, first/last-stage extras; then the 1F1B schedule "
            "(m + p − 1)·(t_f + t_b), the exposed DP gradient sync and the optimizer. Side by side: the "
            "same model on the specification alone."),
        new_code_cell(
            'pr_measured = predict(cfg, measured)\n'
            'pr_spec = predict(cfg, spec)\n'
            'print(format_table(pr_measured))'),
        new_code_cell(
            'pd.DataFrame({"measured profile": pr_measured.breakdown_s, "spec only": pr_spec.breakdown_s}).assign(\n'
            '    share=lambda t: t["measured profile"] / pr_measured.step_time_s)'),
        new_markdown_cell(
            "## Breakdown\n\n"
            "Stacked by component: the tallest block limits the step. `bubble` is the pipeline's idle "
            "time ((p−1)/m of the ideal), `recompute` the forward run again under activation "
            "checkpointing."),
        new_code_cell('plots.step_breakdown({measured.name: pr_measured, f"spec {spec.name}": pr_spec})'),
        new_markdown_cell(
            "## The benchmark's two-term model\n\n"
            "t = α·b·L·(36sd² + 6s²d)/(PP·TP) + β·4·b·L·s·d/PP, with α and β taken from the same profile. "
            "It ignores the bubble, recompute, the LM head and DP/PP communication, so it is a lower "
            "bound of sorts; the difference is what those terms cost."),
        new_code_cell(
            'sm = pr_measured.seed_model\n'
            'pd.Series({"alpha_s_per_mac": sm["alpha"], "beta_s_per_element": sm["beta"],\n'
            '           "two_term_step_s": sm["step_time_s"], "full_prediction_s": pr_measured.step_time_s,\n'
            '           "ratio": sm["step_time_s"] / pr_measured.step_time_s})'),
        new_markdown_cell(
            "## Projection to more nodes\n\n"
            "Weak scaling: tp × pp and the micro-batches per pipeline fixed, dp grown with the nodes "
            "(so the global batch grows), node counts in powers of two up to the spec machine. "
            "FOM = (6·s·d² + s²·d)·b·L / T, exactly as the benchmark defines it."),
        new_code_cell(
            'nodes = default_nodes(cfg, spec)\n'
            'proj = {measured.name: project(cfg, measured, nodes), f"spec {spec.name}": project(cfg, spec, nodes)}\n'
            'display(pd.DataFrame(proj[measured.name]))\n'
            'plots.projection(proj)'),
    ]


def crosscheck() -> list:
    return [
        new_markdown_cell(
            "# Cross-check against Megatron-DeepSpeed\n\n"
            "What this shows: a Megatron-DeepSpeed training log parsed with "
            "`full_model.megatron.parse_log`, its steady-state iteration time, and the predictor's step "
            "time for the log's configuration on this run's measured profile: the error, and the "
            "TFLOP/s both imply by Megatron's LM formula.\n\n"
            "Why: a prediction is trusted only once it has been checked against a real training run "
            "of the same configuration. On the real machine, set `MICROBENCH_MEGATRON_LOG` to the job's "
            "log (and `MICROBENCH_MODEL` to its preset). Without one, this notebook writes a log itself, "
            "in Megatron-DeepSpeed's current `key=value` form: from the run's own reference training "
            "step (`full_model.train`, rows with kind `train_summary`) when the run has one — real "
            "measurements — else **synthetic numbers, invented to show the mechanics, from which no "
            "accuracy conclusion may be drawn**. The parser's other formats are exercised by the files "
            "in `tests/fixtures/megatron/`.\n\n" + RUN_MD),
        new_code_cell(SETUP),
        new_code_cell(PRED_SETUP),
        new_markdown_cell("## The log\n\nParse a real log if one is given; otherwise write one (see above)."),
        new_code_cell(
            'import tempfile\n'
            'from microbench.model.metrics import megatron_tflops\n'
            'from full_model.megatron.logparse import parse_log, format_iteration_line\n'
            '\n'
            'LOG = os.environ.get("MICROBENCH_MEGATRON_LOG")\n'
            'p = cfg.parallel\n'
            'if LOG:\n'
            '    origin = f"real log {LOG}"\n'
            'else:\n'
            '    ts = df[(df["kind"] == "train_summary") & (df["status"].fillna("ok") == "ok")]\n'
            '    if len(ts) and isinstance(ts.iloc[0].get("time_us_samples"), list):\n'
            '        step_ms = [t / 1e3 for t in ts.iloc[0]["time_us_samples"]]\n'
            '        origin = "the reference training step of this run (measured), written as Megatron log lines"\n'
            '    else:\n'
            '        base = predict(cfg, measured).step_time_s * 1e3\n'
            '        step_ms = [base * f for f in (1.31, 1.12, 1.09, 1.11, 1.10)]  # INVENTED: first slow, then ~+10 %\n'
            '        origin = "SYNTHETIC (invented numbers: the prediction × 1.1 with a slow first iteration)"\n'
            '    lines = [format_iteration_line(i, train_iters=len(step_ms), elapsed_ms=ms,\n'
            '                                   global_batch_size=p.global_batch, lm_loss=7.0 - 0.1 * i,\n'
            '                                   samples_per_second=p.global_batch / (ms / 1e3),\n'
            '                                   tokens_per_gpu_per_second=p.global_batch * cfg.model.seq_len / (ms / 1e3) / p.world_size,\n'
            '                                   tflops_lm=megatron_tflops(cfg, ms / 1e3), consumed_samples=i * p.global_batch,\n'
            '                                   seq_len=cfg.model.seq_len, timestamp="2025-07-01 12:00:00")\n'
            '             for i, ms in enumerate(step_ms, 1)]\n'
            '    LOG = Path(tempfile.mkdtemp()) / "megatron.log"\n'
            '    LOG.write_text("some launcher noise\\n" + "\\n".join(lines) + "\\n")\n'
            'result = parse_log(LOG)\n'
            'print(origin)\n'
            'print(f"{len(result.iterations)} iterations, {len(result.unreadable)} unreadable line(s)")\n'
            'result.iterations[["iteration", "elapsed_ms", "global_batch_size", "seq_len", "tflops_lm", "tflops_formula", "format"]]'),
        new_markdown_cell(
            "## Steady state vs prediction\n\n"
            "The first iteration carries compilation, allocation and warm-up, so the measured step is the "
            "median of the iterations after it. The prediction is for the configuration the log ran: "
            "the model preset with the log's global batch and sequence length."),
        new_code_cell(
            'from microbench.model.config import with_layout\n'
            'it = result.iterations\n'
            'steady = it[it["iteration"] > it["iteration"].min()] if len(it) > 1 else it\n'
            'measured_s = float(steady["elapsed_ms"].median()) / 1e3\n'
            'gbs = it["global_batch_size"].dropna()\n'
            'seq = it["seq_len"].dropna()\n'
            'log_cfg = with_layout(cfg, global_batch=int(gbs.iloc[-1]) if len(gbs) else None,\n'
            '                      seq_len=int(seq.iloc[-1]) if len(seq) else None)\n'
            'pr = predict(log_cfg, measured)\n'
            'summary = pd.Series({"measured_step_s": measured_s, "predicted_step_s": pr.step_time_s,\n'
            '                     "error_pct": 100 * (pr.step_time_s / measured_s - 1),\n'
            '                     "log_tflops_lm": float(steady["tflops_lm"].median()),\n'
            '                     "predicted_tflops_lm": megatron_tflops(log_cfg, pr.step_time_s)})\n'
            'summary'),
        new_markdown_cell(
            "## Where the difference could come from\n\n"
            "The predicted breakdown next to the gap: a gap larger than a component means something the "
            "model does not price (host overhead, stragglers, an unmeasured overlap); a gap of the size "
            "of one component points at it (e.g. `tp_comm` on a TP allreduce measured at another group "
            "size)."),
        new_code_cell(
            'gap = measured_s - pr.step_time_s\n'
            'pd.Series(pr.breakdown_s, name="predicted_s").to_frame().assign(\n'
            '    share=lambda t: t["predicted_s"] / pr.step_time_s,\n'
            '    gap_over_component=lambda t: gap / t["predicted_s"].where(t["predicted_s"] > 0))'),
        new_code_cell(
            'plots.predicted_vs_measured(pd.DataFrame({"label": [f"{log_cfg.model.name} ({origin.split(\' \')[0]})"],\n'
            '                                          "measured_s": [measured_s], "predicted_s": [pr.step_time_s]}))'),
    ]


def write_all() -> list[Path]:
    out = []
    for name, cells in (("collectives", collectives()), ("gemms", gemms()),
                        ("prediction", prediction()), ("crosscheck", crosscheck())):
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"}})
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{name}-{i:02d}"  # stable ids: regenerating gives no spurious diff
        path = HERE / f"{name}.ipynb"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all():
        print(f"wrote {p}")
