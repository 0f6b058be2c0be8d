"""The model and layout flags, declared once for every command that takes them.

The probes, the reference step (``full_model.train``), the real framework's runs
(``full_model.megatron run``), the predictor and its users (``analysis.predict``, ``project``,
``crosscheck``) all describe a training configuration the same way: a preset (``--model``),
dimensions that override it (``--layers --hidden …``), a layout (``--tp --pp --dp --mbs --gbs``)
and the step's schedule (``--interleave --recompute --sequence-parallel --zero``). Each command
picks the flags it offers with :func:`add_model_args`; :func:`config_from_args` turns them into
a :class:`~microbench.model.config.TrainConfig` (through ``with_layout``), one way for all.

Two readings of an unstated layout flag, because the commands mean two different things:

- ``layout="world"`` — the command *runs* the layout on this world (probes, reference step,
  framework run): ``--tp``/``--pp`` default to 1, ``--dp`` fills the world, no interleave.
- ``layout="preset"`` — the command *prices* a configuration (predictor, cross-check): an
  unstated flag keeps the preset's value.

A bad value is a :class:`~microbench.runtime.errors.UsageError` (a ``ValueError``) naming the
flag and the values: one line, exit 2, printed by the command.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable, Literal, Mapping, Sequence

from microbench.model.config import PRESETS, RECOMPUTE, ModelConfig, ParallelConfig, TrainConfig, preset, with_layout
from microbench.runtime.errors import UsageError

DIM_FLAGS = {"layers": "num_layers", "hidden": "hidden", "heads": "num_heads", "kv-heads": "num_kv_heads",
             "ffn": "ffn_hidden", "seq": "seq_len", "vocab": "vocab_size"}
"""Dimension flag → the :class:`ModelConfig` field it overrides."""
LAYOUT_FLAGS = {"tp": "tp", "pp": "pp", "dp": "dp", "mbs": "micro_batch", "gbs": "global_batch",
                "interleave": "interleave", "recompute": "recompute", "sequence-parallel": "sequence_parallel",
                "zero": "zero_stage"}
"""Layout and schedule flag → the :class:`ParallelConfig` field it sets."""
MODEL_FLAGS = ("model", *DIM_FLAGS, "gated", "dtype")
ALL_FLAGS = (*MODEL_FLAGS, *LAYOUT_FLAGS)
CUSTOM_NEEDS = ("layers", "hidden", "heads", "ffn", "seq", "vocab")
"""Without ``--model``, the dimensions a model needs (``--kv-heads`` defaults to ``--heads``)."""
INT_FLAGS = (*DIM_FLAGS, "tp", "pp", "dp", "mbs", "gbs", "interleave")
DEFAULT_CHOICES: dict[str, tuple] = {"dtype": ("bf16", "fp16", "fp32"), "recompute": RECOMPUTE,
                                     "zero": (0, 1, 2, 3)}
LayoutFrom = Literal["world", "preset"]
READ = "model_flags_read"
"""The namespace attribute naming the flags :func:`config_from_args` reads for this command."""
OPTIONAL = "model_optional"
"""The namespace attribute saying the command runs without a model too (a probe's ``--shape``)."""

_LAYOUT_HELP = {"tp": "tensor-parallel size", "pp": "pipeline stages", "dp": "data-parallel size",
                "mbs": "micro-batch size", "gbs": "global batch", "interleave": "virtual pipeline chunks per stage",
                "recompute": "activation recompute", "sequence-parallel": "Megatron sequence parallelism",
                "zero": "ZeRO stage"}
_ZERO = {0: "0 plain allreduce", 1: "1 sharded optimizer state", 2: "2 also gradients", 3: "3 also weights"}
_WORLD_DEFAULT = {"tp": "1", "pp": "1", "dp": "world / (tp·pp)", "interleave": "1",
                  "gbs": "the preset's micro-batches per pipeline"}


def _attr(flag: str) -> str:
    return flag.replace("-", "_")


def _has(args: argparse.Namespace, flag: str) -> bool:
    """Whether this command has the flag (offered, or fixed by ``defaults``); a namespace built
    by hand (tests) has what it holds. Only these are read: a probe's own ``-d/--dtype`` is the
    dtype of its buffers, not an override of the model's."""
    read = getattr(args, READ, None)
    return flag in read if read is not None else hasattr(args, _attr(flag))


def _get(args: argparse.Namespace, flag: str) -> Any:
    return getattr(args, _attr(flag), None) if _has(args, flag) else None


def add_model_args(ap: argparse.ArgumentParser, *, flags: Iterable[str] = ALL_FLAGS, layout: LayoutFrom,
                   model: str | None = None, model_help: str | None = None,
                   choices: Mapping[str, Sequence[Any]] | None = None,
                   defaults: Mapping[str, Any] | None = None, optional: bool = False) -> None:
    """Add the ``flags`` this command offers (names from :data:`ALL_FLAGS`, without dashes) in
    two argument groups, "model" and "layout"; ``layout`` as in :func:`config_from_args` (it
    says, in the help, what an unstated flag means).

    ``model`` is ``--model``'s default preset (None: no preset unless stated). ``choices``
    narrows a flag's choices (``{"zero": (0, 1)}`` where a command supports only those).
    ``defaults`` maps a flag to its default, or — for a flag the command does not offer — to
    the value it always uses (``full_model.megatron run`` offers no ``--recompute`` and runs
    without). An unset flag is None: "unstated". ``optional``: the command also runs without a
    model (no ``--model``, no dimension stated: :func:`preset_config` gives None)."""
    flags = list(flags)
    unknown = [f for f in [*flags, *(defaults or {})] if f not in ALL_FLAGS]
    assert not unknown, f"add_model_args: unknown flag(s) {unknown}; known: {ALL_FLAGS}"
    opts = {**DEFAULT_CHOICES, **(choices or {})}
    if any(f in MODEL_FLAGS for f in flags):
        g = ap.add_argument_group("model")
        if "model" in flags:
            g.add_argument("--model", default=model, help=model_help or (
                f"preset: {', '.join(PRESETS)}" + (f" (default {model})" if model else "")))
        for flag, field in DIM_FLAGS.items():
            if flag in flags:
                g.add_argument(f"--{flag}", type=int, help=f"override the preset's {field}")
        if "gated" in flags:
            g.add_argument("--gated", action="store_true", default=None, help="SwiGLU MLP (three matrices)")
        if "dtype" in flags:
            g.add_argument("--dtype", choices=opts["dtype"], help="override the preset's dtype")
    if any(f in LAYOUT_FLAGS for f in flags):
        g = ap.add_argument_group("layout")
        for flag in (f for f in LAYOUT_FLAGS if f in flags):
            default = (defaults or {}).get(flag)
            default = ("the preset's" if layout == "preset" else _WORLD_DEFAULT.get(flag, "the preset's")) \
                if default is None else default
            what = f"{_LAYOUT_HELP[flag]} (default {default})"
            if flag == "sequence-parallel":
                g.add_argument("--sequence-parallel", action="store_true", default=None, help=what)
            elif flag in ("recompute", "zero"):
                if flag == "zero":
                    what += ": " + ", ".join(_ZERO[z] for z in opts["zero"])
                g.add_argument(f"--{flag}", type=type(opts[flag][0]), choices=opts[flag], help=what)
            else:
                g.add_argument(f"--{flag}", type=int, help=what, **({"metavar": "V"} if flag == "interleave" else {}))
    ap.set_defaults(**{READ: (*flags, *(defaults or {})), OPTIONAL: optional}, **{_attr(f): v for f, v in (defaults or {}).items()})


def _stated(args: argparse.Namespace, flags: Iterable[str]) -> str:
    return " ".join(f"--{f} {_get(args, f)}" for f in flags if _get(args, f) not in (None, False))


def preset_config(args: argparse.Namespace) -> TrainConfig | None:
    """``--model``'s preset. Without one: the model the dimension flags describe (on
    ParallelConfig's default layout), or None where the command offers no dimensions (a probe
    run without a model measures sizes, not a configuration)."""
    name = _get(args, "model")
    if name is not None:
        if name not in PRESETS:
            raise UsageError(f"--model {name!r}: unknown preset; known: {', '.join(PRESETS)}")
        return preset(name)
    if not any(_has(args, f) for f in DIM_FLAGS):
        return None
    if getattr(args, OPTIONAL, False) and all(_get(args, f) is None for f in DIM_FLAGS):
        return None
    missing = [f"--{f}" for f in CUSTOM_NEEDS if _get(args, f) is None]
    if missing:
        raise UsageError(f"give --model PRESET ({', '.join(PRESETS)}) or all of {' '.join(missing)}")
    dims = {field: _get(args, f) for f, field in DIM_FLAGS.items() if _get(args, f) is not None}
    if _get(args, "dtype") is not None:
        dims["dtype"] = _get(args, "dtype")
    try:
        model = ModelConfig(**dims, gated_mlp=bool(_get(args, "gated")))
    except ValueError as e:
        raise UsageError(f"{_stated(args, DIM_FLAGS)}: {e}") from None
    return TrainConfig(model=model, parallel=ParallelConfig())


def config_from_args(args: argparse.Namespace, *, layout: LayoutFrom, world_size: int | None = None,
                     base: TrainConfig | None = None) -> TrainConfig | None:
    """The configuration the flags describe: ``base`` (default: :func:`preset_config`) with
    every stated flag applied through ``with_layout``; None where there is no model (see
    :func:`preset_config`). With ``world_size``, the layout must fill that world.

    ``layout="world"``: the command runs the layout on this world (``--tp``/``--pp`` default
    1, ``--dp`` fills ``world_size``, no interleave); ``layout="preset"``: an unstated flag
    keeps the preset's value."""
    for flag in INT_FLAGS:
        v = _get(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag} {v}: must be a positive integer")
    cfg = base if base is not None else preset_config(args)
    if cfg is None:
        return None
    dims = {field: _get(args, f) for f, field in DIM_FLAGS.items()}
    dims.update(gated_mlp=_get(args, "gated"), dtype=_get(args, "dtype"))
    lay = {field: _get(args, f) for f, field in LAYOUT_FLAGS.items()}
    model = _get(args, "model")
    if layout == "world":
        tp, pp = lay["tp"] or 1, lay["pp"] or 1
        dp = lay["dp"] if lay["dp"] is not None else max(1, (world_size or tp * pp) // (tp * pp))
        lay.update(tp=tp, pp=pp, dp=dp, interleave=lay["interleave"] or 1)
        where = f"--model {model} --tp {tp} --pp {pp} --dp {dp}"
    else:
        where = " ".join(filter(None, (f"--model {model}" if model else _stated(args, DIM_FLAGS),
                                       _stated(args, LAYOUT_FLAGS))))
    try:
        cfg = with_layout(cfg, **dims, **lay)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    if world_size is not None:
        try:
            cfg.parallel.check_world(world_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return cfg
