"""PBS job scripts that run Megatron-DeepSpeed on Aurora with the layout of a TrainConfig.

Why generate rather than hand-write: the full-model run is the check on the predictor, so
it must run *exactly* the configuration the probes measured. Every number in the script
(ranks, TP/PP/DP, micro and global batch, accumulation steps, model shape) is derived from
one validated :class:`~microbench.model.config.TrainConfig`; nothing is typed twice. With
``with_probes`` the same allocation first runs the microbenchmark campaign, so prediction and
measurement share nodes, network placement and software stack.

Aurora facts used (ALCF user docs, oneCCL and job-launch pages): 12 tiles per node exposed as
12 devices (``ZE_FLAT_DEVICE_HIERARCHY=FLAT``); PALS ``mpiexec`` with PMIx; cores 0 and 52
are kept for the OS, hence the 8-core blocks 1-48 / 53-100 for 12 ranks; oneCCL must be
told to use PMIx and MPI transport; ranks come from ``PALS_RANKID``/``PALS_LOCAL_RANKID``
and ``PMI_RANK``/``PMI_SIZE`` must never be exported (it breaks ``MPI_Init`` there).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from microbench.model.config import TrainConfig, preset, with_layout

# Environment for oneCCL/libfabric on Aurora: only settings documented by ALCF, with why.
AURORA_ENV: dict[str, str] = {
    "CCL_PROCESS_LAUNCHER": "pmix",   # oneCCL learns ranks from PALS' PMIx (ALCF oneCCL docs)
    "CCL_ATL_TRANSPORT": "mpi",       # oneCCL over Aurora's MPICH, not raw OFI
    "CCL_KVS_MODE": "mpi",            # key-value store through MPI instead of sockets
    "PALS_PMI": "pmix",               # PALS serves PMIx to the ranks
    "FI_PROVIDER": "cxi",             # Slingshot-11 libfabric provider
    "FI_MR_CACHE_MONITOR": "userfaultfd",  # memory-registration cache monitor ALCF recommends
    "FI_CXI_DEFAULT_CQ_SIZE": "131072",    # large completion queue: avoids overflow at scale
    "FI_CXI_RX_MATCH_MODE": "hybrid",      # fall back to software matching when HW list fills
    "ZE_FLAT_DEVICE_HIERARCHY": "FLAT",    # each of the 12 tiles is its own device
}
AURORA_CORES_PER_SOCKET = 52   # Xeon Max 9470: 2 × 52 cores
AURORA_CORES_PER_RANK = 8      # the published 12-rank bind list uses 8-core blocks


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """Everything about the job that is not the model or the layout."""

    nodes: int
    """Nodes requested (``#PBS -l select``)."""
    ranks_per_node: int = 12
    """Ranks (tiles) per node; 12 on Aurora."""
    account: str = "YOUR_PROJECT"
    """PBS ``-A`` project; the default is a placeholder to replace."""
    queue: str = "prod"
    """PBS ``-q`` queue."""
    walltime: str = "01:00:00"
    """PBS walltime, HH:MM:SS."""
    filesystems: str = "home:flare"
    """PBS ``-l filesystems`` (Aurora requires it)."""
    train_script: str = "pretrain_gpt_alcf.py"
    """Megatron-DeepSpeed entry point, relative to ``megatron_dir``."""
    megatron_dir: str = "$PBS_O_WORKDIR/Megatron-DeepSpeed"
    """Checkout of Megatron-DeepSpeed on the shared filesystem."""
    train_iters: int = 10
    """Iterations to run: enough for steady-state step times, not a training run."""
    backend: str = "ccl"
    """``--distributed-backend`` (ccl on Aurora, nccl on NVIDIA)."""
    with_probes: bool = False
    """Run ``python -m microbench`` on the same allocation before training."""
    comms_logger: bool = False
    """Enable DeepSpeed's comms logger (prints a per-op summary table the parser reads)."""
    extra_args: tuple[str, ...] = ()
    """Extra Megatron arguments appended verbatim."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment overrides/additions on top of :data:`AURORA_ENV`."""
    tokenizer_args: tuple[str, ...] | None = None
    """Tokenizer flags replacing the model's default (a local run uses NullTokenizer)."""
    data_path: str = '"$DATA_PATH"'
    """Value of the data flag (a shell variable in the job script, a path in a local run)."""
    ds_config: str = '"$DS_CONFIG"'
    """Value of ``--deepspeed_config``."""
    timing_log_level: int = 1
    """``--timing-log-level``: 1 prints the (min, max) block; 2 adds forward-backward/optimizer."""


def layout_for(model: str, *, nodes: int, ranks_per_node: int = 12, tp: int | None = None,
               pp: int | None = None, dp: int | None = None, micro_batch: int | None = None,
               global_batch: int | None = None) -> TrainConfig:
    """The preset on ``nodes × ranks_per_node`` ranks, validated; ValueError names the equation.

    ``dp`` defaults to what fills the allocation, so ``--nodes 128`` on the 1T preset runs
    DP 2 without further flags.
    """
    if nodes < 1 or ranks_per_node < 1:
        raise ValueError(f"nodes({nodes}) and ranks_per_node({ranks_per_node}) must be ≥ 1")
    base = preset(model)
    world = nodes * ranks_per_node
    tp = tp or base.parallel.tp
    pp = pp or base.parallel.pp
    if dp is None:
        if world % (tp * pp):
            raise ValueError(
                f"nodes({nodes}) × ranks_per_node({ranks_per_node}) = {world} is not a "
                f"multiple of tp({tp}) × pp({pp}) = {tp * pp}")
        dp = world // (tp * pp)
    if tp * pp * dp != world:
        raise ValueError(
            f"tp({tp}) × pp({pp}) × dp({dp}) = {tp * pp * dp} ≠ nodes({nodes}) × "
            f"ranks_per_node({ranks_per_node}) = {world}")
    cfg = with_layout(base, tp=tp, pp=pp, dp=dp, micro_batch=micro_batch,
                      global_batch=global_batch, ranks_per_node=ranks_per_node)
    cfg.parallel.check_world(world)
    return cfg


def cpu_bind_list(ranks_per_node: int) -> str:
    """PALS ``--cpu-bind`` value: equal core blocks per socket, skipping cores 0 and 52.

    For 12 ranks this is the list ALCF publishes (1-8:…:41-48:53-60:…:93-100).
    """
    if ranks_per_node % 2 or ranks_per_node > 2 * (AURORA_CORES_PER_SOCKET - 1):
        return "core"  # no even socket split: let PALS place one core per rank
    per_socket = ranks_per_node // 2
    width = min(AURORA_CORES_PER_RANK, (AURORA_CORES_PER_SOCKET - 1) // per_socket)
    blocks = []
    for socket in range(2):
        first = socket * AURORA_CORES_PER_SOCKET + 1
        for i in range(per_socket):
            lo = first + i * width
            blocks.append(f"{lo}-{lo + width - 1}")
    return "list:" + ":".join(blocks)


def deepspeed_config(cfg: TrainConfig, *, comms_logger: bool = False,
                     wall_clock_breakdown: bool = True) -> dict:
    """DeepSpeed JSON: batch sizes from the layout, ZeRO stage, dtype, timers on.

    ``wall_clock_breakdown=False`` for DeepSpeed 0.18 with PP > 1, where it crashes the
    pipeline engine (../shared/vendor/README.md)."""
    p, m = cfg.parallel, cfg.model
    ds: dict = {
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.num_microbatches,
        "steps_per_print": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": m.dtype == "bf16"},
        "fp16": {"enabled": m.dtype == "fp16"},
        "data_types": {"grad_accum_dtype": p.grad_dtype},
        "wall_clock_breakdown": wall_clock_breakdown,  # prints "time (ms) | fwd_microstep: …" lines we parse
    }
    if comms_logger:
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True,
                              "debug": False}
    return ds


def megatron_args(cfg: TrainConfig, *, opts: JobOptions) -> list[str]:
    """Megatron-DeepSpeed command-line flags for the model and layout of ``cfg``.

    Llama-family models (RMSNorm) get rotary embeddings, no biases and the Llama-2
    tokenizer, as in ALCF's 1T run; LayerNorm models are GPT-style (learned positions,
    biases, GPT-2 BPE). ModelConfig has no position-embedding field, hence this rule.
    """
    m, p = cfg.model, cfg.parallel
    llama = m.norm == "rmsnorm"
    a = ["--num-layers", m.num_layers, "--hidden-size", m.hidden,
         "--num-attention-heads", m.num_heads, "--ffn-hidden-size", m.ffn_hidden,
         "--seq-length", m.seq_len, "--max-position-embeddings", m.seq_len]
    if m.num_kv_heads != m.num_heads:
        a += ["--num-key-value-heads", m.num_kv_heads]
    if m.gated_mlp:
        a += ["--swiglu"]
    if llama:
        # rotary instead of, not on top of, Megatron's learned absolute position embedding
        a += ["--normalization", "rmsnorm", "--use-rotary-position-embeddings", "--no-position-embedding",
              "--disable-bias-linear", "--tokenizer-type", "Llama2Tokenizer",
              "--tokenizer-model", '"$TOKENIZER_MODEL"']
        if opts.tokenizer_args is not None:
            a = a[:-4] + list(opts.tokenizer_args)
    elif opts.tokenizer_args is not None:
        a += list(opts.tokenizer_args)
    else:
        a += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", '"$VOCAB_FILE"',
              "--merge-file", '"$MERGE_FILE"']
    if not m.tied_embeddings:
        a += ["--untie-embeddings-and-output-weights"]
    a += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}[m.dtype]
    a += ["--tensor-model-parallel-size", p.tp, "--pipeline-model-parallel-size", p.pp,
          "--micro-batch-size", p.micro_batch, "--global-batch-size", p.global_batch]
    if p.interleave > 1:
        a += ["--num-layers-per-virtual-pipeline-stage", m.num_layers // (p.pp * p.interleave)]
    if p.sequence_parallel:
        a += ["--sequence-parallel"]
    if p.recompute == "full":
        a += ["--checkpoint-activations", "--checkpoint-num-layers", 1]
    elif p.recompute == "selective":
        a += ["--recompute-granularity", "selective"]
    if p.grad_dtype == "fp32":
        a += ["--accumulate-allreduce-grads-in-fp32"]
    if p.zero_stage >= 2:
        # DeepSpeed's pipeline engine, which this fork uses even at PP 1, refuses ZeRO-2/3
        # ("incompatible with pipeline parallelism"): GPTModel without it (vendor README)
        if p.pp > 1:  # full_model.megatron.run.refuse_unrunnable says so before any launch
            raise ValueError(f"zero stage {p.zero_stage} with pp {p.pp}: DeepSpeed's pipeline engine refuses "
                             "ZeRO-2/3; use pp 1 (run with --no-pipeline-parallel) or ZeRO-1")
        a += ["--no-pipeline-parallel"]
    a += ["--deepspeed", "--deepspeed_config", opts.ds_config, f"--zero-stage={p.zero_stage}",
          "--distributed-backend", opts.backend,
          "--train-iters", opts.train_iters, "--log-interval", 1,
          "--eval-iters", 0, "--eval-interval", opts.train_iters + 1,
          "--timing-log-level", opts.timing_log_level,  # prints the "(min, max) time across ranks" block
          "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
          "--weight-decay", "0.1", "--clip-grad", "1.0",
          "--adam-beta1", "0.9", "--adam-beta2", "0.95",
          "--attention-dropout", "0", "--hidden-dropout", "0", "--split", "100,0,0"]
    data_flag = "--data-file-list" if "alcf" in opts.train_script else "--data-path"
    a += [data_flag, opts.data_path]
    if opts.backend in ("ccl", "gloo"):
        # CUDA-only fused kernels do not exist on XPU or CPU.
        a += ["--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
              "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion"]
    return [str(x) for x in a] + list(opts.extra_args)


def _continued(words: list[str], indent: str = "    ") -> str:
    """One flag and its values per line, with backslash continuations (diffable, greppable)."""
    lines: list[list[str]] = []
    for w in words:
        if w.startswith("--") or not lines:
            lines.append([])
        lines[-1].append(w)
    return (" \\\n" + indent).join(" ".join(line) for line in lines)


def render_job_script(cfg: TrainConfig, *, opts: JobOptions) -> str:
    """The whole PBS script, as text. ``cfg`` must already fill ``opts.nodes``."""
    world = opts.nodes * opts.ranks_per_node
    assert cfg.parallel.world_size == world, f"layout world {cfg.parallel.world_size} ≠ {opts.nodes}×{opts.ranks_per_node}"
    launch = (f"mpiexec --no-vni --pmi=pmix -np {world} --ppn {opts.ranks_per_node} "
              f"--cpu-bind {cpu_bind_list(opts.ranks_per_node)} --hostfile \"$PBS_NODEFILE\"")
    out = [*_pbs_header(cfg, opts=opts), *_allocation_checks(cfg, opts=opts), *_environment(opts),
           *_rank_wrapper(), *_deepspeed_json(cfg, opts=opts)]
    if opts.with_probes:
        out += _probes(cfg, launch)
    out += _training(cfg, opts=opts, launch=launch)
    return "\n".join(out) + "\n"


def _pbs_header(cfg: TrainConfig, *, opts: JobOptions) -> list[str]:
    """``#PBS`` directives, then what the script was generated for and what it needs."""
    p, m = cfg.parallel, cfg.model
    return [
        "#!/bin/bash -l",
        f"#PBS -N mds-{m.name}",
        f"#PBS -l select={opts.nodes}",
        f"#PBS -l walltime={opts.walltime}",
        f"#PBS -l filesystems={opts.filesystems}",
        f"#PBS -A {opts.account}",
        f"#PBS -q {opts.queue}",
        "#PBS -j oe",
        "#",
        f"# Generated by `python -m full_model.megatron script` for preset {m.name}:",
        f"#   tp({p.tp}) × pp({p.pp}) × dp({p.dp}) = {p.world_size} = nodes({opts.nodes}) × "
        f"ranks_per_node({opts.ranks_per_node})",
        f"#   micro_batch {p.micro_batch}, global_batch {p.global_batch}, "
        f"gradient_accumulation {p.num_microbatches}, zero_stage {p.zero_stage}, "
        f"recompute {p.recompute}",
        "# Needs: DATA_PATH (data prefix or file list) and "
        + ("TOKENIZER_MODEL" if m.norm == "rmsnorm" else "VOCAB_FILE, MERGE_FILE")
        + ", e.g. qsub -v DATA_PATH=…",
        "",
    ]


def _allocation_checks(cfg: TrainConfig, *, opts: JobOptions) -> list[str]:
    """Refuse an allocation of another size and missing inputs before anything starts."""
    m = cfg.model
    out = [
        "module load frameworks  # before set -u: module scripts read unset variables",
        "set -euo pipefail",
        'cd "$PBS_O_WORKDIR"',
        f"NNODES={opts.nodes}",
        f"RANKS_PER_NODE={opts.ranks_per_node}",
        "NRANKS=$((NNODES * RANKS_PER_NODE))",
        'got=$(sort -u "$PBS_NODEFILE" | wc -l)',
        'if [ "$got" -ne "$NNODES" ]; then',
        '    echo "error: allocation has $got nodes, this script was generated for $NNODES" >&2',
        "    exit 2",
        "fi",
        ': "${DATA_PATH:?set DATA_PATH}"',
    ]
    if m.norm == "rmsnorm":
        out.append(': "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the Llama-2 tokenizer.model}"')
    else:
        out += [': "${VOCAB_FILE:?set VOCAB_FILE}"', ': "${MERGE_FILE:?set MERGE_FILE}"']
    return out + [
        'RUNDIR="${RUNDIR:-$PBS_O_WORKDIR/runs/mds-' + m.name + '-${PBS_JOBID%%.*}}"',
        'mkdir -p "$RUNDIR"',
        "",
    ]


def _environment(opts: JobOptions) -> list[str]:
    """oneCCL/libfabric/Level Zero settings, recorded with the run; the rendezvous."""
    env = {**AURORA_ENV, **opts.env}
    return [
        "# oneCCL / libfabric / Level Zero settings (ALCF Aurora docs); recorded with the run.",
        *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        "env | grep -E '^(CCL|FI|ZE)_' > \"$RUNDIR/env.txt\" || true",
        "",
        "# Rendezvous for torch.distributed: rank 0's host; PALS gives no world size, we do.",
        'export MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")',
        "export MASTER_PORT=${MASTER_PORT:-29500}",
        "export WORLD_SIZE=$NRANKS",
        "",
    ]


def _rank_wrapper() -> list[str]:
    """RANK/LOCAL_RANK from PALS in a per-rank wrapper; PMI rank variables never exported."""
    return [
        "# Per-rank wrapper: RANK/LOCAL_RANK from PALS. PMI rank variables are never exported:",
        "# on Aurora that breaks MPI_Init.",
        'cat > "$RUNDIR/pals_rank.sh" <<\'EOF\'',
        "#!/bin/bash",
        "export RANK=$PALS_RANKID",
        "export LOCAL_RANK=$PALS_LOCAL_RANKID",
        'exec "$@"',
        "EOF",
        'chmod +x "$RUNDIR/pals_rank.sh"',
        "",
    ]


def _deepspeed_json(cfg: TrainConfig, *, opts: JobOptions) -> list[str]:
    p = cfg.parallel
    return [
        f"# DeepSpeed config: train_batch_size = micro({p.micro_batch}) × "
        f"accumulation({p.num_microbatches}) × dp({p.dp}).",
        'DS_CONFIG="$RUNDIR/ds_config.json"',
        'cat > "$DS_CONFIG" <<\'EOF\'',
        json.dumps(deepspeed_config(cfg, comms_logger=opts.comms_logger), indent=2),
        "EOF",
        "",
    ]


def _probes(cfg: TrainConfig, launch: str) -> list[str]:
    """The campaign on the same allocation first: it measures this preset's per-rank shard and
    fits its groups to the allocation."""
    probe = ["python", "-m", "microbench", "--model", cfg.model.name]
    return [
        "# Component probes on the same allocation (microbench reads PALS_RANKID itself).",
        f"{launch} \\",
        f"    {' '.join(probe)} --out \"$RUNDIR/probes\" \\",
        '    || echo "warning: probes exited with $?; training still runs" >&2',
        "",
    ]


def _training(cfg: TrainConfig, *, opts: JobOptions, launch: str) -> list[str]:
    """The training launch, its log teed into the run, its exit code passed on."""
    return [
        f'cd "{opts.megatron_dir}"',
        "set +e",
        f"{launch} \\",
        f'    "$RUNDIR/pals_rank.sh" python {shlex.quote(opts.train_script)} \\',
        "    " + _continued(megatron_args(cfg, opts=opts)) + " \\",
        '    2>&1 | tee "$RUNDIR/train.log"',
        "rc=${PIPESTATUS[0]}",
        "set -e",
        'echo "training exited with $rc; parse: python -m full_model.megatron parse '
        '$RUNDIR/train.log"',
        'exit "$rc"',
    ]
