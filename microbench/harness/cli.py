"""The command-line parser every entry point uses: a bad argument is one line and exit 2."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error prints ``error: PROG: message`` alone (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog.removeprefix('python -m ')}: {message}\n")


def user_path(text: str) -> Path:
    """A path argument as the user meant it: against the directory the command was run from,
    made absolute at once (before any process changes directory: a rank of the real
    Megatron-DeepSpeed starts inside its checkout). Symbolic links are kept, not resolved."""
    return Path(os.path.abspath(os.path.expanduser(text)))
