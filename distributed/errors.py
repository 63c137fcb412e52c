"""Typed errors: every failure a user can cause or fix is a MacrunError with a message and a hint.

Library code raises these and never prints or exits; the CLI and the wizard turn them into one
`error:` line, one `hint:` line and the documented exit code (see README, "Exit codes").
"""

from __future__ import annotations


class MacrunError(Exception):
    """Base class: `message` says what went wrong, `hint` says what to do about it."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(MacrunError):
    """A config file or a --set override is wrong."""

    exit_code = 2


class HostsError(MacrunError):
    """A hosts file is wrong."""

    exit_code = 2


class EnvContractError(MacrunError):
    """A rank was started without the environment macrun promises it."""

    exit_code = 2


class DataError(MacrunError):
    """The training data cannot be found, read or tokenised."""

    exit_code = 2


class CheckpointError(MacrunError):
    """A checkpoint is missing, truncated, altered or incompatible."""


class RendezvousError(MacrunError):
    """The rendezvous store refused us, timed out or went away."""


class HostError(MacrunError):
    """A host could not be reached, authenticated or prepared (raised before any rank starts)."""

    exit_code = 3


class RunFailedError(MacrunError):
    """A rank failed and the run was torn down."""


class LinkError(MacrunError):
    """A network link between ranks could not be probed (peer unreachable, connection dropped)."""


class TrainingError(MacrunError):
    """Training itself went wrong: the ranks' weights diverged, or every rank's update became NaN/Inf."""


class UsageError(MacrunError):
    """The command line itself is wrong (a bad option value, a missing command)."""

    exit_code = 2


def report(exc: MacrunError) -> int:
    """For rank-side entry points (`python -m distributed.worker`, `distributed.bench`): print the error and
    hint the way the CLI does, to stderr, and return the exit code. Library code raises instead."""
    import sys

    print(f"error: {exc.message}", file=sys.stderr, flush=True)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr, flush=True)
    return exc.exit_code
