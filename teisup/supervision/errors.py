"""Errors raised by supervisors; each message names the supervisor and the child."""

from __future__ import annotations

from .policy import ExitReason

__all__ = [
    "ChildRunningError",
    "ChildStartError",
    "DuplicateChildError",
    "MaxChildrenError",
    "RestartIntensityExceeded",
    "SupervisionError",
    "SupervisorNotRunning",
    "SupervisorStartError",
    "UnknownChildError",
]


class SupervisionError(Exception):
    """Base class of every error a supervisor raises."""


class DuplicateChildError(SupervisionError, ValueError):
    """A child with that id already exists under this supervisor."""


class UnknownChildError(SupervisionError, LookupError):
    """No child with that id under this supervisor."""


class MaxChildrenError(SupervisionError):
    """The supervisor already holds ``max_children`` children."""


class ChildRunningError(SupervisionError):
    """The operation needs a child that is not running (or about to restart)."""


class SupervisorNotRunning(SupervisionError):
    """The supervisor is not running, so it cannot start or stop children."""


class ChildStartError(SupervisionError):
    """A child failed before it reported ready."""

    def __init__(self, message: str, exit: ExitReason) -> None:
        super().__init__(message)
        self.exit = exit


class SupervisorStartError(ChildStartError):
    """One of the supervisor's own children failed to start; it stopped the rest."""


class RestartIntensityExceeded(SupervisionError):
    """Too many restarts within the period: the supervisor stopped all its children."""
