"""The supervision core: Erlang/OTP-style supervisors on Trio nurseries.

Pure policy (`policy`, `lifecycle`) decides; the shell (`supervisor`, with a
child's runs in `runtime` and its operation queue in `inbox`) only starts,
waits and cancels. See ARCHITECTURE.md for the model and an example.
"""

from .errors import (
    ChildRunningError,
    ChildStartError,
    DuplicateChildError,
    MaxChildrenError,
    RestartIntensityExceeded,
    SupervisionError,
    SupervisorNotRunning,
    SupervisorStartError,
    UnknownChildError,
)
from .events import BusStatistics, TransitionBus, TransitionEvent
from .introspection import (
    ChildCounts,
    ChildInfo,
    SupervisorPhase,
    SupervisorStatistics,
    TreeNode,
)
from .lifecycle import ChildState, InvalidTransition, Lifecycle, Trigger
from .policy import (
    Backoff,
    ExitKind,
    ExitReason,
    GiveUp,
    Intensity,
    NoRestart,
    Restart,
    RestartDecision,
    RestartTracker,
    RestartType,
    RestartWindow,
    should_restart,
)
from .specs import BRUTAL_KILL, INFINITY, ChildKind, ChildSpec, ShutdownSpec, Strategy, Worker
from .supervisor import ChildContext, Supervisor

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "Backoff",
    "BusStatistics",
    "ChildContext",
    "ChildCounts",
    "ChildInfo",
    "ChildKind",
    "ChildRunningError",
    "ChildSpec",
    "ChildStartError",
    "ChildState",
    "DuplicateChildError",
    "ExitKind",
    "ExitReason",
    "GiveUp",
    "Intensity",
    "InvalidTransition",
    "Lifecycle",
    "MaxChildrenError",
    "NoRestart",
    "Restart",
    "RestartDecision",
    "RestartIntensityExceeded",
    "RestartTracker",
    "RestartType",
    "RestartWindow",
    "ShutdownSpec",
    "Strategy",
    "SupervisionError",
    "Supervisor",
    "SupervisorNotRunning",
    "SupervisorPhase",
    "SupervisorStartError",
    "SupervisorStatistics",
    "TransitionBus",
    "TransitionEvent",
    "TreeNode",
    "Trigger",
    "UnknownChildError",
    "Worker",
    "should_restart",
]
