"""The data :mod:`analysis.calibrate` fits and scores: vTrain's CSV or the project's own, each
row one :class:`Observation` (a configuration and its measured step time). A bad row is a
``ValueError`` naming file, line and column; a misspelt column of the project's format is
refused (its setting would stay at the default, unsaid)."""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from microbench.model.config import ModelConfig, ParallelConfig, TrainConfig

VTRAIN_VOCAB = 50257  # GPT-2 tokenizer (vTrain's default)


@dataclass(frozen=True, slots=True)
class Observation:
    cfg: TrainConfig
    step_time_s: float
    size: str = ""
    """Model-size label (e.g. '3.6B'): the unit left out by ``--cv model``."""
    p2p_scatter_gather: bool = False
    """Pipeline sends 1/tp of the activation per rank (Megatron-LM's default until 2023,
    ``--no-scatter-gather-tensors-in-pipeline`` turns it off)."""


def _pad_vocab(vocab: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of 128·tp (--make-vocab-size-divisible-by)."""
    q = 128 * tp
    return (vocab + q - 1) // q * q


def _size_label(model: ModelConfig) -> str:
    return f"{model.num_params / 1e9:.1f}B"


class _Row:
    """One CSV row whose fields raise ValueError naming file, line and column."""

    def __init__(self, row: dict[str, str | None], *, where: str):
        self.row, self.where = row, where

    def has(self, col: str) -> bool:
        return col in self.row and self.row[col] not in (None, "")

    def raw(self, col: str) -> str:
        if col not in self.row or self.row[col] is None:
            raise ValueError(f"{self.where}: missing column {col!r}")
        return str(self.row[col]).strip()

    def num(self, col: str, kind: Callable[[str], Any] = int, default: Any = None) -> Any:
        if default is not None and not self.has(col):
            return default
        text = self.raw(col)
        try:
            v = kind(text)
        except ValueError:
            raise ValueError(f"{self.where}: column {col!r}: {text!r} is not a valid {kind.__name__}") from None
        if not np.isfinite(v) or v <= 0 and col not in ("zero", "kv_heads"):
            raise ValueError(f"{self.where}: column {col!r}: {text!r} must be a finite number > 0")
        return v

    def flag(self, col: str, default: bool) -> bool:
        if not self.has(col):
            return default
        text = self.raw(col).lower()
        if text not in ("1", "0", "true", "false", "yes", "no", "y", "n"):
            raise ValueError(f"{self.where}: column {col!r}: {text!r} is not a boolean (true/false)")
        return text in ("1", "true", "yes", "y")

    def text(self, col: str, default: str) -> str:
        return self.raw(col) if self.has(col) else default


def _vtrain_case(r: _Row, *, ranks_per_node: int) -> Observation:
    tp, h = r.num("tensor parallelism"), r.num("hidden size")
    model = ModelConfig(num_layers=r.num("# layers"), hidden=h, num_heads=r.num("attention heads"),
                        ffn_hidden=4 * h, gated_mlp=False, seq_len=r.num("sequence length"),
                        vocab_size=_pad_vocab(VTRAIN_VOCAB, tp), norm="layernorm", dtype="fp16",
                        tied_embeddings=True, dropout=True)
    # Megatron's local DDP: gradients accumulate in one contiguous buffer, allreduced in place
    # (no DeepSpeed engine copies), as these runs have been modelled since issue 19
    par = ParallelConfig(tp=tp, pp=r.num("pipeline parallelism"), dp=r.num("data parallelism"),
                         micro_batch=r.num("micro batch"), global_batch=r.num("global batch"),
                         recompute="full", grad_dtype="fp16", grad_sync="flat", ranks_per_node=ranks_per_node)
    if r.has("# GPUs") and par.world_size != r.num("# GPUs"):
        raise ValueError(f"{r.where}: tensor × pipeline × data parallelism = {par.tp} × {par.pp} × {par.dp} = "
                         f"{par.world_size} ≠ '# GPUs' {r.raw('# GPUs')}")
    label = f"{r.num('Parameters (billion)', float):g}B" if r.has("Parameters (billion)") else _size_label(model)
    return Observation(TrainConfig(model=model, parallel=par), r.num("iteration time (ms)", float) / 1e3, label,
                p2p_scatter_gather=True)


def _own_case(r: _Row, *, ranks_per_node: int) -> Observation:
    dtype = r.text("dtype", "bf16")
    model = ModelConfig(num_layers=r.num("layers"), hidden=r.num("hidden"), num_heads=r.num("heads"),
                        num_kv_heads=r.num("kv_heads", default=0), ffn_hidden=r.num("ffn"),
                        gated_mlp=r.flag("gated", False), seq_len=r.num("seq"), vocab_size=r.num("vocab"),
                        norm=r.text("norm", "layernorm"), dtype=dtype,  # type: ignore[arg-type]
                        dropout=r.flag("dropout", False), tied_embeddings=r.flag("tied", False))
    par = ParallelConfig(tp=r.num("tp"), pp=r.num("pp"), dp=r.num("dp"), micro_batch=r.num("mbs"),
                         global_batch=r.num("gbs"), interleave=r.num("interleave", default=1),
                         recompute=r.text("recompute", "full"),  # type: ignore[arg-type]
                         zero_stage=r.num("zero", default=0) if r.has("zero") else 0,
                         grad_dtype=r.text("grad_dtype", "fp32"),  # type: ignore[arg-type]
                         grad_sync=r.text("grad_sync", "deepspeed"),  # type: ignore[arg-type]
                         sequence_parallel=r.flag("sequence_parallel", False), ranks_per_node=ranks_per_node)
    if r.has("ranks") and par.world_size != r.num("ranks"):
        raise ValueError(f"{r.where}: tp × pp × dp = {par.tp} × {par.pp} × {par.dp} = {par.world_size} "
                         f"≠ ranks {r.raw('ranks')}")
    t = r.num("step_time_s", float) if r.has("step_time_s") or not r.has("elapsed_ms") \
        else r.num("elapsed_ms", float) / 1e3
    return Observation(TrainConfig(model=model, parallel=par), t, _size_label(model),
                p2p_scatter_gather=r.flag("scatter_gather", False))


OWN_COLUMNS = ("layers", "hidden", "heads", "kv_heads", "ffn", "gated", "seq", "vocab", "norm", "dtype",
               "dropout", "tied", "tp", "pp", "dp", "mbs", "gbs", "interleave", "recompute", "zero",
               "grad_dtype", "grad_sync", "sequence_parallel", "scatter_gather", "ranks", "step_time_s",
               "elapsed_ms")
"""The columns the project's own CSV format is read from (:func:`_own_case`)."""


def read_cases(path: str | Path, *, ranks_per_node: int = 8, ignored: list[str] | None = None) -> list[Observation]:
    """Every row of a vTrain or project CSV as an Observation; ValueError names file, line and column.
    In the project format a column that is a known one misspelt (``recompte``, ``Recompute``) is
    refused; any other it does not read (a note, a name) is appended to ``ignored``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration data {str(path)!r} not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    header = reader.fieldnames or []
    twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if twice is not None:  # csv.DictReader keeps the last of two equal columns without a word
        raise ValueError(f"{path}:1: column {twice!r} appears twice in the header")
    if not rows:
        raise ValueError(f"{path}: no rows")
    vtrain = "hidden size" in rows[0]
    if not vtrain:
        known = {c.lower(): c for c in OWN_COLUMNS}
        for col in (c for c in rows[0] if c is not None and c not in OWN_COLUMNS):
            close = known.get(col.strip().lower()) or next(iter(difflib.get_close_matches(
                col.strip().lower(), known, n=1, cutoff=0.8)), None)
            if close:  # a misspelt column would leave its setting at the default, unsaid
                raise ValueError(f"{path}: column {col!r} is not one this reader knows: did you mean "
                                 f"{known.get(close, close)!r}?")
            if ignored is not None:
                ignored.append(col)
    cases = []
    for i, row in enumerate(rows, start=2):
        if row.get(None):  # csv.DictReader's restkey: fields beyond the header
            raise ValueError(f"{path}:{i}: {len(row) - 1 + len(row[None])} fields, the header has {len(row) - 1}")
        r = _Row(row, where=f"{path}:{i}")
        try:
            cases.append((_vtrain_case if vtrain else _own_case)(r, ranks_per_node=ranks_per_node))
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(f"{path}:") else f"{path}:{i}: {msg}") from None
    return cases
