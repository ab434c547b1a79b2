"""What a supervisor reports about itself: plain msgspec Structs that encode to JSON.

These are OTP's ``which_children`` / ``count_children`` and a recursive tree
snapshot, the body of the control plane's supervisor-tree endpoint.
"""

from __future__ import annotations

import enum

import msgspec

from .lifecycle import ChildState
from .policy import ExitReason, RestartType
from .specs import ChildKind, Strategy

__all__ = ["ChildCounts", "ChildInfo", "SupervisorPhase", "SupervisorStatistics", "TreeNode"]


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
