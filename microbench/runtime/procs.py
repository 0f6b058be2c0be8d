"""Whether a process on this host has ended: what the watchdog waits for, what a reader asks
before waiting on a watchdog that is closing a run, and what a rank asks of its peers on the
same host. Its own module so that the watchdog (which writes results) and the results reader
(which waits for the watchdog) both import it, and not each other.
"""
from __future__ import annotations

import os


def ended(pid: int) -> bool:
    """Gone or a zombie (the launcher has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
