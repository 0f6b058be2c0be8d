"""The runtime's errors: what the harness turns into one line and an exit code."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line value: printed as one line, exit code 2."""


class RendezvousError(UsageError):
    """The rendezvous address cannot be used (unresolvable, port taken): one line, exit 2."""


class RendezvousFailure(RuntimeError):
    """The rendezvous did not complete in time (a rank never came): one line, exit 1."""
