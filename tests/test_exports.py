"""The public surface is deliberate: pin it, and require a docstring on each class."""

from __future__ import annotations

import inspect

import teisup
import teisup.supervision

SUPERVISION_API = {
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
}


def test_supervision_exports_are_pinned() -> None:
    assert set(teisup.supervision.__all__) == SUPERVISION_API
    for name in SUPERVISION_API:
        assert hasattr(teisup.supervision, name), name


def test_public_classes_are_documented() -> None:
    for name in teisup.supervision.__all__:
        obj = getattr(teisup.supervision, name)
        if inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_version_is_exposed() -> None:
    assert isinstance(teisup.__version__, str)
