"""The command-line parser every entry point uses: a bad argument is one line and exit 2."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error prints ``error: PROG: message`` alone (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog.removeprefix('python -m ')}: {message}\n")
