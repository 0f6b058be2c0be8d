"""Model and parallel-layout configuration: frozen, self-validating, with named presets.

A preset is a plain function returning a complete :class:`TrainConfig`; variants come from
``dataclasses.replace`` (see :func:`with_layout`). Errors are ``ValueError`` naming the field
and the numbers, so a typo on an 768-rank launch line is caught before ``init_process_group``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

Dtype = Literal["bf16", "fp16", "fp32"]
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "int32": 4, "int64": 8}
RECOMPUTE = ("none", "selective", "full")


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A GPT-style decoder: what the workload needs to derive every shape."""

    name: str = "custom"
    """Preset name, or 'custom' for dimensions given by hand."""
    num_layers: int
    """Transformer layers (L)."""
    hidden: int
    """Hidden size (d)."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int = 0
    """Key/value heads (GQA); 0 means the same as num_heads (no GQA)."""
    ffn_hidden: int
    """MLP inner size (f)."""
    gated_mlp: bool = True
    """SwiGLU (three FFN matrices) if True, else GELU with two."""
    seq_len: int
    """Sequence length (s)."""
    vocab_size: int
    """Vocabulary size as used by the embedding (already padded)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalization layer kind."""
    dtype: Dtype = "bf16"
    """Compute (and activation communication) dtype."""
    tied_embeddings: bool = False
    """Share the input embedding with the LM head."""
    dropout: bool = False
    """GPT-3-style hidden and attention dropout (Megatron's default p = 0.1; Llama-style
    models train without). Adds the attention-probability dropout, a memory-bound pass over
    the b·a·s² scores, and one mask byte per element of each hidden dropout."""

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "hidden", "num_heads", "ffn_hidden", "seq_len", "vocab_size")
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _positive(self, "num_kv_heads")
        if self.hidden % self.num_heads:
            raise ValueError(
                f"hidden({self.hidden}) % num_heads({self.num_heads}) = "
                f"{self.hidden % self.num_heads} ≠ 0: head dim must be an integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads({self.num_heads}) % num_kv_heads({self.num_kv_heads}) ≠ 0")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be rmsnorm or layernorm, got {self.norm!r}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_hidden(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    @property
    def layer_params(self) -> int:
        """Weights of one layer (no biases): QKV, output projection, MLP, two norms."""
        d = self.hidden
        attn = d * (d + 2 * self.kv_hidden) + d * d
        mlp = self.ffn_matrices * d * self.ffn_hidden
        norms = 2 * d * (2 if self.norm == "layernorm" else 1)
        return attn + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden

    @property
    def num_params(self) -> int:
        """Total parameters: layers, input embedding, LM head unless tied, final norm."""
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + head + self.hidden


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """How one training step is laid out over ranks (Megatron's order: tp, then dp, then pp)."""

    tp: int = 1
    """Tensor-parallel size (a TP group stays inside a node)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    dp: int = 1
    """Data-parallel replicas."""
    micro_batch: int = 1
    """Sequences per micro-batch (mbs)."""
    global_batch: int = 1
    """Sequences per optimizer step across all replicas."""
    interleave: int = 1
    """Virtual pipeline chunks per stage (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: TP allreduce becomes allgather + reduce-scatter."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: none, selective (attention core) or full (every layer)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0 = plain DP allreduce; 1 = optimizer state sharded)."""
    grad_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Dtype of accumulated gradients and hence of the DP gradient reduction."""
    grad_sync: Literal["deepspeed", "flat"] = "deepspeed"
    """How the gradients reach the DP reduction. ``deepspeed`` (Megatron-DeepSpeed, the
    benchmark's framework): the engine (ZeRO-0) and the ZeRO-1/2 optimizer copy the gradients
    into a bucket, scale it, flatten it and allreduce it — ZeRO-1/2 too
    (``zero_optimization.use_multi_rank_bucket_allreduce``, default true), each rank keeping
    its slice — then copy back (``deepspeed/runtime/zero/stage_1_and_2.py``). ``flat``: the
    gradients live in flat buffers that are reduced in place and reduce-scattered under ZeRO
    (the project's reference step, ``full_model.reference.parallel``)."""
    ranks_per_node: int = 0
    """Ranks per node, for deciding whether a group crosses nodes (0 = unknown/all on one)."""

    def __post_init__(self) -> None:
        _positive(self, "tp", "pp", "dp", "micro_batch", "global_batch", "interleave")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.grad_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"grad_dtype must be bf16, fp16 or fp32, got {self.grad_dtype!r}")
        if self.grad_sync not in ("deepspeed", "flat"):
            raise ValueError(f"grad_sync must be deepspeed or flat, got {self.grad_sync!r}")
        if self.ranks_per_node < 0:
            raise ValueError(f"ranks_per_node must be ≥ 0, got {self.ranks_per_node}")
        per_step = self.micro_batch * self.dp
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch({self.global_batch}) % (micro_batch({self.micro_batch}) × "
                f"dp({self.dp}) = {per_step}) = {self.global_batch % per_step} ≠ 0")
        if self.interleave > 1 and self.pp == 1:
            raise ValueError(f"interleave({self.interleave}) > 1 needs pp > 1, got pp=1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step per pipeline (gradient-accumulation steps)."""
        return self.global_batch // (self.micro_batch * self.dp)

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"tp({self.tp}) × pp({self.pp}) × dp({self.dp}) = {self.world_size} "
                f"≠ world {world_size}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A model on a layout; the checks that need both live here."""

    model: ModelConfig
    parallel: ParallelConfig
    note: str = ""
    """Provenance of a preset (where its numbers come from, and any choice made)."""

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        checks = [
            ("num_heads", m.num_heads, "tp", p.tp),
            ("num_kv_heads", m.num_kv_heads, "tp", p.tp),
            ("ffn_hidden", m.ffn_hidden, "tp", p.tp),
            ("vocab_size", m.vocab_size, "tp", p.tp),
        ]
        for a, av, b, bv in checks:
            if av % bv:
                raise ValueError(f"{a}({av}) % {b}({bv}) = {av % bv} ≠ 0")
        chunks = p.pp * p.interleave
        if m.num_layers % chunks:
            raise ValueError(
                f"num_layers({m.num_layers}) % (pp({p.pp}) × interleave({p.interleave}) = "
                f"{chunks}) = {m.num_layers % chunks} ≠ 0")
        if p.sequence_parallel and (m.seq_len * p.micro_batch) % p.tp:
            raise ValueError(
                f"sequence_parallel needs micro_batch({p.micro_batch}) × seq_len({m.seq_len}) "
                f"divisible by tp({p.tp})")
        if p.interleave > 1 and p.num_microbatches % p.pp:
            raise ValueError(
                f"interleaved schedule needs num_microbatches({p.num_microbatches}) % "
                f"pp({p.pp}) = 0")

    @property
    def layers_per_stage(self) -> int:
        return self.model.num_layers // self.parallel.pp

    def stage_params(self, stage: int) -> int:
        """Parameters held by one TP rank of pipeline stage ``stage`` (0-based)."""
        m, p = self.model, self.parallel
        if not 0 <= stage < p.pp:
            raise ValueError(f"stage {stage} outside 0..{p.pp - 1}")
        norm_params = 2 * m.hidden * (2 if m.norm == "layernorm" else 1)
        sharded_layer = (m.layer_params - norm_params) // p.tp + norm_params
        n = self.layers_per_stage * sharded_layer
        if stage == 0:
            n += m.embedding_params // p.tp
        if stage == p.pp - 1:
            n += m.hidden
            if not m.tied_embeddings or p.pp > 1:
                n += m.embedding_params // p.tp
        return n

    @property
    def params_per_rank(self) -> int:
        """The largest per-rank parameter count over stages (what bounds memory)."""
        return max(self.stage_params(s) for s in range(self.parallel.pp))


# ---------------------------------------------------------------------------------------------
# Presets. Each returns a complete TrainConfig; the layout is the one the source ran.

def alcf_1t() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="alcf-1t", num_layers=128, hidden=24576, num_heads=192,
                          ffn_hidden=98304, gated_mlp=True, seq_len=2048,
                          vocab_size=32256,  # Llama-2's 32,000 padded to a multiple of 128·tp(12) = 1,536
                          norm="rmsnorm", dtype="bf16"),
        parallel=ParallelConfig(tp=12, pp=64, dp=1, micro_batch=1, global_batch=512,
                                recompute="full", zero_stage=1, grad_dtype="fp32",
                                ranks_per_node=12),
        note="ALCF 1T.sc on Aurora (Megatron-DeepSpeed): 64 nodes × 12 tiles, TP12 PP64 DP1.")


def alcf_1t_readme() -> TrainConfig:
    base = alcf_1t()
    # 25,872 = 2^4·3·7^2·11 is not divisible by 192 heads; 132 heads of 196 divides it and
    # keeps heads % tp(12) = 0 with a head dim (196) close to the 1T.sc run's 128…256 range.
    model = dataclasses.replace(base.model, name="alcf-1t-readme", hidden=25872, num_heads=132,
                                num_kv_heads=132)
    return TrainConfig(model=model, parallel=base.parallel,
                       note="ALCF-4 benchmark README shape (hidden 25,872, FFN 98,304, 128 layers); "
                            "132 heads of 196 chosen because 192 does not divide 25,872.")


def megatron_1t() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="megatron-1t", num_layers=128, hidden=25600, num_heads=160,
                          ffn_hidden=102400, gated_mlp=False, seq_len=2048, vocab_size=51200,
                          norm="layernorm", dtype="bf16"),
        parallel=ParallelConfig(tp=8, pp=64, dp=6, micro_batch=1, global_batch=3072,
                                recompute="full", ranks_per_node=8),
        note="Megatron-LM 1T (Narayanan et al., SC21, Table 1): 3072 A100, TP8 PP64.")


def gpt3_175b() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="gpt3-175b", num_layers=96, hidden=12288, num_heads=96,
                          ffn_hidden=49152, gated_mlp=False, seq_len=2048, vocab_size=51200,
                          norm="layernorm", dtype="bf16"),
        parallel=ParallelConfig(tp=8, pp=8, dp=16, micro_batch=1, global_batch=1536,
                                recompute="full", ranks_per_node=8),
        note="GPT-3 175B (Brown et al. 2020) on Megatron-LM's 1024-GPU layout.")


def llama2_7b() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="llama2-7b", num_layers=32, hidden=4096, num_heads=32,
                          ffn_hidden=11008, gated_mlp=True, seq_len=4096, vocab_size=32000,
                          norm="rmsnorm", dtype="bf16"),
        parallel=ParallelConfig(tp=1, pp=1, dp=8, micro_batch=1, global_batch=64,
                                zero_stage=1, ranks_per_node=8),
        note="Llama 2 7B (Touvron et al. 2023).")


def tiny() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="tiny", num_layers=4, hidden=128, num_heads=8, ffn_hidden=512,
                          gated_mlp=True, seq_len=128, vocab_size=512, norm="rmsnorm",
                          dtype="fp32"),
        parallel=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=2, global_batch=8),
        note="Seconds on a laptop CPU; fp32 because CPU bf16 GEMMs are slow and imprecise.")


def mds_cpu() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="mds-cpu", num_layers=4, hidden=512, num_heads=8, ffn_hidden=2048,
                          gated_mlp=True, seq_len=512, vocab_size=2048, norm="rmsnorm",
                          dtype="fp32"),
        parallel=ParallelConfig(tp=1, pp=1, dp=1, micro_batch=1, global_batch=8),
        note="Real Megatron-DeepSpeed cross-check on a CPU (issue 11): compute-bound, 2-4 s per step "
             "on 2 cores; fp32 because AVX2-only CPUs run bf16 GEMMs ~40x slower.")


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "alcf-1t": alcf_1t,
    "alcf-1t-readme": alcf_1t_readme,
    "megatron-1t": megatron_1t,
    "gpt3-175b": gpt3_175b,
    "llama2-7b": llama2_7b,
    "tiny": tiny,
    "mds-cpu": mds_cpu,
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def with_layout(cfg: TrainConfig, **changes: object) -> TrainConfig:
    """The same model on another layout: ``with_layout(alcf_1t(), tp=2, pp=1, dp=2)``.

    Changing tp/pp/dp without a global batch keeps the preset's micro-batches per pipeline
    when that divides, else falls back to one micro-batch per replica.
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_changes = {k: changes.pop(k) for k in list(changes) if k in model_fields}
    if "num_heads" in model_changes and "num_kv_heads" not in model_changes and \
            cfg.model.num_kv_heads == cfg.model.num_heads:
        model_changes["num_kv_heads"] = model_changes["num_heads"]  # no GQA stays no GQA
    model = dataclasses.replace(cfg.model, **model_changes) if model_changes else cfg.model
    p = cfg.parallel
    if "global_batch" not in changes:
        dp = changes.get("dp", p.dp)
        mbs = changes.get("micro_batch", p.micro_batch)
        changes["global_batch"] = p.num_microbatches * mbs * dp
    if "ranks_per_node" not in changes and {"tp", "pp", "dp"} & set(changes):
        changes["ranks_per_node"] = 0
    parallel = dataclasses.replace(p, **changes)
    return TrainConfig(model=model, parallel=parallel, note=cfg.note)


HOST_WIDTH = dict(hidden=64, num_heads=4, ffn_hidden=256, seq_len=64)
"""Where host time is measured: a width at which every kernel is far shorter than the host's
code around it (the host probe, the Megatron framework probe), so a phase's time is the host's."""


def narrowed(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` at :data:`HOST_WIDTH` — same layout, layers, micro-batches, recompute, norm, MLP
    kind and dropout; four query heads with the model's GQA ratio kept where it divides."""
    m = cfg.model
    group = m.num_heads // m.num_kv_heads
    kv = max(1, HOST_WIDTH["num_heads"] // group) if HOST_WIDTH["num_heads"] % group == 0 else HOST_WIDTH["num_heads"]
    return with_layout(cfg, **HOST_WIDTH, num_kv_heads=kv)
