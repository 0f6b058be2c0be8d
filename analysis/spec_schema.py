"""The system YAML's schema: ``analysis/systems/NAME.yaml`` loaded into :class:`SystemSpec`
(pydantic, strict). An unknown key, a wrong type or a value out of range is refused with one
line naming the file, the line where YAML knows it, and the dotted key. Every knob is required
— none has a default in code — so a spec file is the whole truth about the system it
describes. Device datasheet figures (peaks, HBM bandwidth, memory, compute units) are not in
the system file: it names its device by key (``device: {model: A100-SXM4-80GB, dtype: bf16}``)
and they come from the one table ``microbench/model/devices.yaml``, so a peak is stated once.

Two top-level records are accepted and not priced: ``provenance`` (dotted key → where the
figure comes from; shown in every ``specified (…)`` source) and ``calibration`` (free form:
how a calibration fitted the knobs). The profile that prices from a spec is
:class:`analysis.spec.SpecProfile`.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microbench.model.systems import system_file
from microbench.model.devices import DEVICES_FILE, DeviceTableError, device
from microbench.model import yamlfile

from analysis.errors import AnalysisError
from analysis.provenance import display_path


Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Efficiency = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DeviceRef(_Strict):
    model: str
    """Key of ``microbench/model/devices.yaml`` (peaks, HBM bandwidth, memory, compute units)."""
    dtype: Literal["bf16", "fp16", "fp32"]
    """Training dtype: the peak that MFU is against."""


class Node(_Strict):
    ranks_per_node: PositiveInt


class EfficiencySpec(_Strict):
    gemm_max: Efficiency
    """Large tile-aligned GEMM, fraction of peak."""
    gemm_tile: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    """Output tile (m × n) of the tile/wave quantization model."""
    gemm_k_half: Positive
    """k at which the k-loop reaches half its asymptotic efficiency."""
    gemm_latency_us: Positive
    attention: Efficiency
    attention_fused: bool
    memop: Efficiency
    memop_latency_us: Positive


class Latency(_Strict):
    """A collective's per-call latency and how it grows with the group: ``base_us +
    per_step_us × steps``, the steps of the algorithm ``law`` (ring: 2(n−1) for an allreduce,
    n−1 for a gather or scatter; tree: 2·log2 n; :func:`microbench.model.metrics.latency_steps`)."""
    base_us: NonNegative
    per_step_us: NonNegative
    law: Literal["ring", "tree"]


class IntraLink(_Strict):
    busbw_gbps: Positive
    p2p_gbps: Positive
    efficiency: Efficiency
    latency: Latency


class InterLink(_Strict):
    nic_gbps: Positive
    nics_per_node: PositiveInt
    efficiency: Efficiency
    latency: Latency


class HostSpec(_Strict):
    """The host's own time per layer per micro-batch in each phase (Python, autograd, the
    launch of every kernel and collective call): on a device that queues kernels asynchronously
    a phase costs max(host, device), on a synchronous one their sum. 0 allowed: none.
    ``tp_call_us``: what each tensor-parallel collective call adds to the host (per call)."""
    fwd_us: NonNegative
    recompute_us: NonNegative
    bwd_us: NonNegative
    tp_call_us: NonNegative


class Network(_Strict):
    intra: IntraLink
    inter: InterLink


class Overlap(_Strict):
    """Exposed fraction of overlappable work (0 = hidden, 1 = exposed)."""
    dp: Fraction
    tp: Fraction
    tp_wgrad: Fraction


class SystemSpec(_Strict):
    name: str
    nodes: PositiveInt | None
    """Nodes of the whole machine; null where the spec describes a node type, not a machine."""
    device: DeviceRef
    node: Node
    efficiency: EfficiencySpec
    network: Network
    host: HostSpec
    overlap: Overlap
    provenance: dict[str, str] | None = None
    """Record, not a knob: dotted key → source of the figure."""
    calibration: dict[str, Any] | None = None
    """Record, not a knob: how a calibration fitted the knobs."""


# ---------------------------------------------------------------------------------------------
# Loading

def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based line of the key at ``loc`` in YAML ``text`` (its nearest existing parent)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def validate_spec(data: Any, *, where: str, text: str | None = None) -> SystemSpec:
    """``data`` as a :class:`SystemSpec`, or AnalysisError: one line, file[:line], key, why."""
    if not isinstance(data, dict):
        raise AnalysisError(f"{where}: expected a mapping at top level, got {type(data).__name__}")
    try:
        spec = SystemSpec.model_validate(data)
    except ValidationError as e:
        # an unknown key first: a misspelled knob also shows up as the knob "missing"
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        first = errs[0]
        loc = tuple(first["loc"])
        line = _line_of(text, loc) if text else None
        key = _dotted_loc(loc)
        if first["type"] == "extra_forbidden":
            siblings = [m["loc"][-1] for m in errs if m["type"] == "missing" and m["loc"][:-1] == loc[:-1]]
            close = difflib.get_close_matches(str(loc[-1]), [str(x) for x in siblings], n=1)
            why = "unknown key" + (f" (did you mean {close[0]}?)" if close else
                                   " (the schema, with every key, is in analysis/spec.py)")
        elif first["type"] == "missing":
            why = "missing (every knob is required; none has a default in code)"
        else:
            why = f"{first['msg']}, got {first.get('input')!r}"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise AnalysisError(f"{where}{f':{line}' if line else ''}: {key}: {why}{more}") from None
    try:
        dev = device(spec.device.model)
    except DeviceTableError as e:
        raise AnalysisError(f"{where}: device.model: {e}") from None
    if spec.device.dtype not in dev["peak_tflops"]:
        raise AnalysisError(f"{where}: device.dtype: {spec.device.dtype!r} has no peak in "
                            f"{display_path(DEVICES_FILE)}: {spec.device.model}.peak_tflops")
    return spec


def read_spec(name_or_path: str | Path) -> tuple[dict[str, Any], str, Path]:
    """(raw mapping, YAML text, path) of a shipped system name or a YAML path."""
    try:
        p = system_file(name_or_path)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{display_path(p)}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yamlfile.load(text)
    except yaml.YAMLError as e:
        line, problem = yamlfile.error_where(e)
        raise AnalysisError(f"{display_path(p)}{f':{line}' if line else ''}: YAML syntax error: {problem}") from None
    if data is None:
        raise AnalysisError(f"{display_path(p)}: empty: a system spec is a YAML mapping with every knob "
                            "(see analysis/systems/*.yaml)")
    return data, text, p


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        if not isinstance(cur.get(part), dict):
            raise AnalysisError(f"knob {dotted}: {part!r} is not a section of the spec")
        cur = cur[part]
    cur[parts[-1]] = value
