"""The public surface is deliberate: pin it, and require a docstring on each class."""

from __future__ import annotations

import inspect

import pytest

import teisup
import teisup.instances
import teisup.rpc
import teisup.security
import teisup.service
import teisup.supervision

PACKAGES = [teisup.supervision, teisup.instances, teisup.rpc, teisup.security, teisup.service]

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


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_public_names_exist_and_classes_are_documented(package: object) -> None:
    for name in package.__all__:  # type: ignore[attr-defined]
        obj = getattr(package, name)
        if inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_version_is_exposed() -> None:
    assert isinstance(teisup.__version__, str)
