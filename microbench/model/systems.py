"""Where a system's specification is, by name: one lookup for the main job (which validates
``--system`` before anything runs) and for the analysis (which loads it). The files are the
analysis package's data (``analysis/systems/NAME.yaml``); a path to any YAML file also names one.
"""
from __future__ import annotations

from pathlib import Path

SYSTEMS_DIR = Path(__file__).resolve().parents[2] / "analysis" / "systems"


def shipped_systems() -> list[str]:
    return sorted(p.stem for p in SYSTEMS_DIR.glob("*.yaml"))


def system_file(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped system name or a path; ValueError naming what exists."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SYSTEMS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ValueError(f"unknown system {str(name_or_path)!r}; shipped: {', '.join(shipped_systems())} "
                         "(or give a path to a YAML file)")
    return p
