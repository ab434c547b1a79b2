"""How a supervisor is told what to run: child specs, strategies, shutdown specs."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

from .policy import Backoff, ExitReason, Intensity, RestartType, Strategy

if TYPE_CHECKING:
    from .supervisor import ChildContext, Supervisor

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "ChildKind",
    "ChildSpec",
    "ShutdownSpec",
    "Strategy",
    "Worker",
    "validate_id",
]


class ChildKind(enum.Enum):
    WORKER = "worker"
    SUPERVISOR = "supervisor"


#: Cancel the child at once, with no stop request first (OTP's ``brutal_kill``).
BRUTAL_KILL: Literal["brutal_kill"] = "brutal_kill"
#: Ask the child to stop and wait as long as it takes (the default for
#: sub-supervisors, which stop their own children within their own specs).
INFINITY: Literal["infinity"] = "infinity"

#: Seconds of grace between the stop request and cancellation, or one of the two.
ShutdownSpec: TypeAlias = float | Literal["brutal_kill", "infinity"]

#: A worker: ``async def worker(ctx) -> ExitReason | None``. It calls
#: ``ctx.started()`` once ready and returns (or raises) when it is done.
Worker: TypeAlias = "Callable[[ChildContext], Awaitable[ExitReason | None]]"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

#: OTP's default grace for workers.
DEFAULT_WORKER_SHUTDOWN = 5.0


def validate_id(value: str) -> str:
    """Return ``value`` if it is a valid child or supervisor id, else raise ValueError."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"id {value!r} must be 1-63 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, eq=False)
class ChildSpec:
    """One child of a supervisor.

    ``start`` is either a worker coroutine function, called with a
    `ChildContext` each time the child (re)starts, or a `Supervisor`, which then
    runs as a sub-tree. ``shutdown`` defaults to 5 s for workers and
    ``"infinity"`` for supervisors, as in OTP. ``intensity`` is the child's own
    give-up limit (None: only the supervisor's intensity applies).

    ``await_ready`` (default True) is OTP's synchronous start: the supervisor
    waits for the worker's ``ctx.started()`` before it starts the next child or
    answers `Supervisor.start_child`. With False it goes on as soon as the task
    is spawned; the child stays ``starting`` until it reports ready, and an exit
    before that is an ordinary exit under its restart policy. Children that
    take minutes to become ready (a model loading) use False.
    """

    id: str
    start: Worker | Supervisor
    restart: RestartType = RestartType.PERMANENT
    shutdown: ShutdownSpec | None = None
    backoff: Backoff = field(default_factory=Backoff)
    intensity: Intensity | None = None
    await_ready: bool = True

    def __post_init__(self) -> None:
        validate_id(self.id)
        if not isinstance(self.restart, RestartType):
            raise TypeError(f"restart must be a RestartType, got {self.restart!r}")
        shutdown = self.shutdown
        if isinstance(shutdown, bool) or not (
            shutdown is None
            or shutdown in (BRUTAL_KILL, INFINITY)
            or (isinstance(shutdown, int | float) and math.isfinite(shutdown) and shutdown >= 0)
        ):
            raise ValueError(
                f"shutdown must be seconds >= 0, 'brutal_kill' or 'infinity', got {shutdown!r}"
            )
        if not (self.kind is ChildKind.SUPERVISOR or callable(self.start)):
            raise TypeError(f"start must be a worker function or a Supervisor, got {self.start!r}")

    @property
    def kind(self) -> ChildKind:
        from .supervisor import Supervisor

        return ChildKind.SUPERVISOR if isinstance(self.start, Supervisor) else ChildKind.WORKER

    @property
    def effective_shutdown(self) -> float | Literal["brutal_kill", "infinity"]:
        if self.shutdown is not None:
            return self.shutdown
        return INFINITY if self.kind is ChildKind.SUPERVISOR else DEFAULT_WORKER_SHUTDOWN
