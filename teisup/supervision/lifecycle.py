"""A supervised child's lifecycle as a transition table, in the style of h11.

Rule: every state change of a child goes through `Lifecycle.fire`, which
consults `TRANSITIONS` and nothing else. A trigger that the table does not
list for the current state is a bug in the caller and raises
`InvalidTransition`; it never silently moves a child somewhere odd.

The usual path is ``STOPPED -START-> STARTING -STARTED-> RUNNING``. A child
that exits by itself goes to ``BACKOFF`` (a restart is scheduled), ``STOPPED``
(its restart type says the exit is final) or ``FAILED`` (its own intensity is
exceeded). A child the supervisor stops passes through ``STOPPING``. A worker
that checks its own health moves between ``RUNNING`` and ``UNHEALTHY``.
``STOPPED`` and ``FAILED`` are at rest; ``START`` leaves both. ``SCHEDULE``
puts a stopped sibling into ``BACKOFF`` when its group is restarted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = ["TRANSITIONS", "ChildState", "InvalidTransition", "Lifecycle", "Trigger"]


class ChildState(enum.Enum):
    """Where a supervised child is in its life."""

    #: Not running and not scheduled to run.
    STOPPED = "stopped"
    #: Its task is running but has not reported ready yet.
    STARTING = "starting"
    #: Ready.
    RUNNING = "running"
    #: Running, but its own health checks fail (reported by the worker).
    UNHEALTHY = "unhealthy"
    #: Asked to stop; waiting for it within its shutdown spec.
    STOPPING = "stopping"
    #: Exited; a restart is scheduled.
    BACKOFF = "backoff"
    #: Exceeded its own restart intensity; stays down until started again.
    FAILED = "failed"


class Trigger(enum.Enum):
    """What happened to a child."""

    START = "start"
    STARTED = "started"
    STOP = "stop"
    TERMINATED = "terminated"
    #: Exited by itself and will not be restarted.
    EXITED = "exited"
    #: Exited by itself (or was stopped for its group) and will be restarted.
    RESTARTING = "restarting"
    #: A stopped sibling joins its group's pending restart.
    SCHEDULE = "schedule"
    GAVE_UP = "gave_up"
    #: The worker reports failing health checks, or recovery from them.
    DEGRADED = "degraded"
    RECOVERED = "recovered"


S, T = ChildState, Trigger

#: state -> {trigger -> next state}
TRANSITIONS: Mapping[ChildState, Mapping[Trigger, ChildState]] = {
    S.STOPPED: {T.START: S.STARTING, T.SCHEDULE: S.BACKOFF},
    S.STARTING: {
        T.STARTED: S.RUNNING,
        T.STOP: S.STOPPING,
        T.EXITED: S.STOPPED,
        T.RESTARTING: S.BACKOFF,
        T.GAVE_UP: S.FAILED,
    },
    S.RUNNING: {
        T.STOP: S.STOPPING,
        T.EXITED: S.STOPPED,
        T.RESTARTING: S.BACKOFF,
        T.GAVE_UP: S.FAILED,
        T.DEGRADED: S.UNHEALTHY,
    },
    S.UNHEALTHY: {
        T.STOP: S.STOPPING,
        T.EXITED: S.STOPPED,
        T.RESTARTING: S.BACKOFF,
        T.GAVE_UP: S.FAILED,
        T.RECOVERED: S.RUNNING,
    },
    S.STOPPING: {T.TERMINATED: S.STOPPED},
    S.BACKOFF: {T.START: S.STARTING, T.STOP: S.STOPPED, T.SCHEDULE: S.BACKOFF},
    S.FAILED: {T.START: S.STARTING, T.SCHEDULE: S.FAILED},
}

del S, T

#: States in which the child's task exists.
ACTIVE_STATES = frozenset(
    {ChildState.STARTING, ChildState.RUNNING, ChildState.UNHEALTHY, ChildState.STOPPING}
)


class InvalidTransition(RuntimeError):
    """A trigger that the table does not allow in the current state."""


class Lifecycle:
    """The current state of one child, moved only by `fire`."""

    __slots__ = ("state",)

    def __init__(self, state: ChildState = ChildState.STOPPED) -> None:
        self.state = state

    def can_fire(self, trigger: Trigger) -> bool:
        return trigger in TRANSITIONS[self.state]

    def fire(self, trigger: Trigger) -> tuple[ChildState, ChildState]:
        """Apply ``trigger``; return ``(old, new)``."""
        old = self.state
        try:
            new = TRANSITIONS[old][trigger]
        except KeyError:
            raise InvalidTransition(
                f"cannot {trigger.value!r} a child in state {old.value!r}"
            ) from None
        self.state = new
        return old, new

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES
