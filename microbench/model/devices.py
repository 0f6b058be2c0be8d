"""The one table of device datasheet figures (``devices.yaml`` beside this file).

The probes use it for ``pct_spec_peak``; the system profiles in ``analysis/systems/`` name a
device by its key and take its peaks, HBM bandwidth, memory and compute units from here, so a
device's peak is stated once. Provenance of any figure: ``specified (microbench/model/devices.yaml:
KEY.FIELD)``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from microbench.model import yamlfile


DEVICES_FILE = Path(__file__).with_name("devices.yaml")
FIELDS = ("match", "peak_tflops", "mem_bw_gbps", "memory_gib", "compute_units", "asynchronous", "source")


class DeviceTableError(ValueError):
    """The device table or a lookup in it is wrong; the message names the key."""


@lru_cache(maxsize=None)
def devices() -> dict[str, dict[str, Any]]:
    """Every device of the table by key, checked: all fields present, rates > 0."""
    with open(DEVICES_FILE) as fh:
        data = yamlfile.load(fh)
    table = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise DeviceTableError(f"{DEVICES_FILE}: expected a non-empty mapping under 'devices'")
    for key, d in table.items():
        where = f"{DEVICES_FILE}: devices.{key}"
        if not isinstance(d, dict):
            raise DeviceTableError(f"{where}: expected a mapping")
        unknown = sorted(set(d) - set(FIELDS))
        missing = [f for f in FIELDS if f not in d]
        if unknown or missing:
            raise DeviceTableError(f"{where}: unknown keys {unknown}, missing {missing}")
        for f in ("mem_bw_gbps", "memory_gib", "compute_units"):
            if not isinstance(d[f], (int, float)) or not d[f] > 0:
                raise DeviceTableError(f"{where}.{f}: must be a number > 0, got {d[f]!r}")
        if not isinstance(d["asynchronous"], bool):
            raise DeviceTableError(f"{where}.asynchronous: must be true or false, got {d['asynchronous']!r}")
        for dt, v in d["peak_tflops"].items():
            if not isinstance(v, (int, float)) or not v > 0:
                raise DeviceTableError(f"{where}.peak_tflops.{dt}: must be a number > 0, got {v!r}")
    return table


def device(key: str) -> dict[str, Any]:
    """The entry for ``key``; DeviceTableError names the known keys."""
    table = devices()
    if key not in table:
        raise DeviceTableError(f"unknown device {key!r} in {DEVICES_FILE.name}; known: {', '.join(table)}")
    return table[key]


def match_device(device_name: str | None) -> str | None:
    """The table key whose ``match`` substrings occur in torch's device name (first in file
    order wins, so specific entries stand before their family), else None."""
    if not device_name:
        return None
    for key, d in devices().items():
        if any(m in device_name for m in d["match"]):
            return key
    return None


def spec_peak(device_name: str | None, what: str) -> float | None:
    """Datasheet TFLOP/s for a dtype, or HBM GB/s for ``'gbps'``, of a device by torch's name;
    None where the device (or that dtype) is not in the table."""
    key = match_device(device_name)
    if key is None:
        return None
    d = devices()[key]
    if what == "gbps":
        return float(d["mem_bw_gbps"])
    v = d["peak_tflops"].get(what)
    return None if v is None else float(v)
