"""Aurora PBS job scripts for Megatron-DeepSpeed: every number comes from the TrainConfig."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from full_model.megatron.jobscript import cpu_bind_list
from full_model.megatron.__main__ import main
from full_model.megatron.jobscript import JobOptions, layout_for, render_job_script

PUBLISHED_12_RANK_BIND = ("list:1-8:9-16:17-24:25-32:33-40:41-48:"
                          "53-60:61-68:69-76:77-84:85-92:93-100")


def script(capsys, *argv: str) -> str:
    assert main(["script", *argv]) == 0
    return capsys.readouterr().out


def ds_config(text: str) -> dict:
    m = re.search(r'cat > "\$DS_CONFIG" <<\'EOF\'\n(.*?)\nEOF\n', text, re.S)
    assert m, "DeepSpeed config heredoc not found"
    return json.loads(m.group(1))


def flag(text: str, name: str) -> str:
    m = re.search(rf"(?m)^\s+{re.escape(name)}[ =](\S+)", text)
    assert m, f"{name} not in script"
    return m.group(1)


def test_alcf_1t_on_64_nodes_requests_64_nodes_and_launches_768_ranks(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64")
    assert "#PBS -l select=64\n" in text
    launch = [ln for ln in text.splitlines() if ln.startswith("mpiexec ")]
    assert len(launch) == 1
    assert f"--no-vni --pmi=pmix -np 768 --ppn 12 --cpu-bind {PUBLISHED_12_RANK_BIND} " \
           '--hostfile "$PBS_NODEFILE"' in launch[0]


def test_alcf_1t_model_flags_match_the_1t_run(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64")
    expected = {"--num-layers": "128", "--hidden-size": "24576",
                "--num-attention-heads": "192", "--ffn-hidden-size": "98304",
                "--seq-length": "2048", "--max-position-embeddings": "2048",
                "--normalization": "rmsnorm", "--tokenizer-type": "Llama2Tokenizer",
                "--tensor-model-parallel-size": "12", "--pipeline-model-parallel-size": "64",
                "--micro-batch-size": "1", "--global-batch-size": "512", "--zero-stage": "1"}
    assert {k: flag(text, k) for k in expected} == expected
    for switch in ("--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear",
                   "--untie-embeddings-and-output-weights", "--bf16",
                   "--checkpoint-activations", "--deepspeed"):
        assert re.search(rf"(?m)^\s+{switch}( |$)", text), switch


@pytest.mark.parametrize("nodes,mbs,gbs", [(64, None, None), (128, None, None),
                                           (128, 2, 2048), (256, 1, 1024)])
def test_deepspeed_json_batch_sizes_are_the_layouts(capsys, nodes, mbs, gbs):
    argv = ["--model", "alcf-1t", "--nodes", str(nodes)]
    argv += ["--mbs", str(mbs)] if mbs else []
    argv += ["--gbs", str(gbs)] if gbs else []
    text = script(capsys, *argv)
    cfg = layout_for("alcf-1t", nodes=nodes, micro_batch=mbs, global_batch=gbs).parallel
    ds = ds_config(text)
    assert ds["train_batch_size"] == cfg.global_batch == int(flag(text, "--global-batch-size"))
    assert ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch
    assert ds["gradient_accumulation_steps"] == cfg.num_microbatches
    assert ds["train_batch_size"] == cfg.micro_batch * cfg.num_microbatches * cfg.dp
    assert ds["zero_optimization"] == {"stage": 1} and ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["wall_clock_breakdown"]
    assert f"-np {nodes * 12} --ppn 12" in text


def test_layout_that_does_not_fill_the_allocation_is_exit_2_naming_the_equation(capsys):
    assert main(["script", "--model", "alcf-1t", "--nodes", "64", "--dp", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tp(12) × pp(64) × dp(2) = 1536 ≠ nodes(64) × ranks_per_node(12) = 768"]


def test_nodes_not_a_multiple_of_tp_pp_is_exit_2(capsys):
    assert main(["script", "--model", "alcf-1t", "--nodes", "63"]) == 2
    assert "tp(12) × pp(64) = 768" in capsys.readouterr().err


def test_ranks_come_from_pals_and_pmi_rank_is_never_exported(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64", "--with-probes")
    assert not re.search(r"PMI_(RANK|SIZE)\s*=", text)
    assert "export RANK=$PALS_RANKID\n" in text
    assert "export LOCAL_RANK=$PALS_LOCAL_RANKID\n" in text
    assert '"$RUNDIR/pals_rank.sh" python pretrain_gpt_alcf.py' in text


def test_aurora_environment_is_set_and_recorded(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64", "--env", "CCL_LOG_LEVEL=info")
    for line in ("module load frameworks", "export CCL_PROCESS_LAUNCHER=pmix",
                 "export CCL_ATL_TRANSPORT=mpi", "export FI_PROVIDER=cxi",
                 "export CCL_LOG_LEVEL=info",
                 "env | grep -E '^(CCL|FI|ZE)_' > \"$RUNDIR/env.txt\""):
        assert line in text
    assert text.index("env.txt") > text.index("export CCL_LOG_LEVEL")


def test_with_probes_runs_microbench_first_on_the_same_allocation(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "128", "--with-probes")
    probe = text.index('python -m microbench --model alcf-1t --out "$RUNDIR/probes"')
    assert probe < text.index("pretrain_gpt_alcf.py")
    assert text.count("mpiexec --no-vni --pmi=pmix -np 1536 --ppn 12") == 2


def test_pbs_options_and_train_script_are_honoured(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64", "--account", "MyProj",
                  "--queue", "debug-scaling", "--walltime", "00:30:00",
                  "--train-script", "pretrain_gpt.py")
    assert "#PBS -A MyProj\n#PBS -q debug-scaling\n" in text
    assert "#PBS -l walltime=00:30:00\n" in text
    assert "python pretrain_gpt.py" in text and flag(text, "--data-path") == '"$DATA_PATH"'


def test_gpt_style_preset_gets_gpt_flags(capsys):
    text = script(capsys, "--model", "gpt3-175b", "--nodes", "128", "--ranks-per-node", "8",
                  "--backend", "nccl")
    assert flag(text, "--tokenizer-type") == "GPT2BPETokenizer"
    assert not re.search(r"--swiglu|--normalization|--disable-bias-linear", text)
    assert flag(text, "--tensor-model-parallel-size") == "8" and "-np 1024 --ppn 8" in text


def test_output_file_is_written(tmp_path, capsys):
    out = tmp_path / "job.pbs"
    assert main(["script", "--model", "alcf-1t", "--nodes", "64", "-o", str(out)]) == 0
    assert out.read_text().startswith("#!/bin/bash")
    assert "tp 12 pp 64 dp 1" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_generated_script_is_valid_bash():
    cfg = layout_for("alcf-1t", nodes=64)
    text = render_job_script(cfg, opts=JobOptions(nodes=64, with_probes=True, comms_logger=True))
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("rpn", [2, 4, 6, 8, 12, 16])
def test_cpu_bind_blocks_are_disjoint_and_avoid_os_cores(rpn):
    spec = cpu_bind_list(rpn)
    if rpn == 12:
        assert spec == PUBLISHED_12_RANK_BIND
    cores: list[int] = []
    for block in spec.removeprefix("list:").split(":"):
        lo, hi = map(int, block.split("-"))
        cores += range(lo, hi + 1)
    assert len(spec.split(":")) - 1 == rpn
    assert len(cores) == len(set(cores)) and not {0, 52} & set(cores)
    assert max(cores) < 104


def test_rotary_replaces_the_learned_position_embedding(capsys):
    text = script(capsys, "--model", "alcf-1t", "--nodes", "64")
    assert "--use-rotary-position-embeddings" in text and "--no-position-embedding" in text


def test_the_campaign_accepts_the_flags_the_script_passes(capsys):
    """The campaign line of a --with-probes script, as bash would split it, read by the
    campaign's own parser (argparse exits 2 if the flags drift) and checked by its validation."""
    import shlex
    from microbench.harness.campaign import parser, validate
    text = script(capsys, "--model", "gpt3-175b", "--nodes", "128", "--ranks-per-node", "8", "--with-probes")
    line = next(ln for ln in text.splitlines() if "python -m microbench" in ln)
    words = shlex.split(line.removesuffix("\\"))
    assert words[:3] == ["python", "-m", "microbench"]
    args = parser().parse_args(words[3:])
    validate(args)
    assert (args.model, args.out, args.system) == ("gpt3-175b", "$RUNDIR/probes", "aurora")
