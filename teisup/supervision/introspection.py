"""What a supervisor reports about itself: plain msgspec Structs that encode to JSON.

These are OTP's ``which_children`` / ``count_children`` and a recursive tree
snapshot, the body of the control plane's supervisor-tree endpoint, and the
functions that build them from a supervisor's child records.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import msgspec

from .lifecycle import ChildState
from .policy import ExitReason, RestartType
from .runtime import Child
from .specs import ChildKind, Strategy

__all__ = [
    "ChildCounts",
    "ChildInfo",
    "SupervisorPhase",
    "SupervisorStatistics",
    "TreeNode",
    "child_info",
    "child_node",
    "count_children",
]


class SupervisorPhase(enum.Enum):
    """A supervisor's own state, reported by the root node of a snapshot."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: It stopped because a child failed to start or its intensity was exceeded.
    FAILED = "failed"


class ChildInfo(msgspec.Struct, frozen=True):
    """One row of `Supervisor.which_children`."""

    id: str
    kind: ChildKind
    restart: RestartType
    state: ChildState
    #: The OS process id, where the child reported one.
    pid: int | None = None


class ChildCounts(msgspec.Struct, frozen=True):
    """OTP's ``count_children``: specs, active children, supervisors, workers."""

    specs: int
    active: int
    supervisors: int
    workers: int


class TreeNode(msgspec.Struct, frozen=True):
    """One node of the supervision tree snapshot.

    Times are seconds: ``uptime`` since the child last reported ready,
    ``next_restart_in`` until the pending restart (only in ``backoff``), and
    ``next_restart_at`` as monotonic time for correlating with events.
    """

    id: str
    kind: ChildKind
    #: A child's `ChildState` value; for the root, its `SupervisorPhase` value.
    state: str
    restart: RestartType | None = None
    strategy: Strategy | None = None
    restarts_in_window: int = 0
    next_restart_at: float | None = None
    next_restart_in: float | None = None
    last_exit: ExitReason | None = None
    pid: int | None = None
    uptime: float | None = None
    children: list[TreeNode] = msgspec.field(default_factory=list)


class SupervisorStatistics(msgspec.Struct, frozen=True):
    """`Supervisor.statistics`: a cheap summary for metrics and health checks."""

    phase: SupervisorPhase
    children: int
    active: int
    restarts_in_window: int
    pending_restarts: int


def child_info(child: Child) -> ChildInfo:
    """One child's row of `Supervisor.which_children`."""
    return ChildInfo(
        id=child.id,
        kind=child.spec.kind,
        restart=child.spec.restart,
        state=child.state,
        pid=child.pid,
    )


def count_children(children: Sequence[Child]) -> ChildCounts:
    """OTP's ``count_children`` over a supervisor's children."""
    supervisors = sum(1 for c in children if c.spec.kind is ChildKind.SUPERVISOR)
    return ChildCounts(
        specs=len(children),
        active=sum(1 for c in children if c.lifecycle.active),
        supervisors=supervisors,
        workers=len(children) - supervisors,
    )


def child_node(child: Child, now: float) -> TreeNode:
    """One child's node of the tree snapshot, with its sub-tree if it is a supervisor."""
    from .supervisor import Supervisor

    sub = child.spec.start if isinstance(child.spec.start, Supervisor) else None
    due = child.next_restart_at if child.state is ChildState.BACKOFF else None
    return TreeNode(
        id=child.id,
        kind=child.spec.kind,
        state=child.state.value,
        restart=child.spec.restart,
        strategy=sub.strategy if sub else None,
        restarts_in_window=child.tracker.restarts_in_window(now),
        next_restart_at=due,
        next_restart_in=max(0.0, due - now) if due is not None else None,
        last_exit=child.last_exit,
        pid=child.pid,
        uptime=now - child.ready_at if child.ready_at is not None else None,
        children=sub.snapshot().children if sub else [],
    )
