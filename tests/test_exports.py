"""The public surface is deliberate: pin it, and require a docstring on each class."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import teisup
import teisup.api
import teisup.embedded
import teisup.grpc
import teisup.instances
import teisup.models
import teisup.rpc
import teisup.security
import teisup.service
import teisup.supervision

PACKAGES = [
    teisup.supervision,
    teisup.security,
    teisup.rpc,
    teisup.instances,
    teisup.embedded,
    teisup.grpc,
    teisup.models,
    teisup.api,
    teisup.service,
]

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


def test_every_package_is_covered() -> None:
    root = Path(teisup.__file__).parent
    found = {p.parent.name for p in root.glob("*/__init__.py")} - {"proto"}
    assert {p.__name__.removeprefix("teisup.") for p in PACKAGES} == found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_each_package_declares_its_exports_once_and_documents_itself(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert names, f"{package.__name__} exports nothing"  # type: ignore[attr-defined]
    assert len(set(names)) == len(names)
    assert inspect.getdoc(package), f"{package.__name__} has no docstring"  # type: ignore[attr-defined]
    # What the package's modules define publicly and it re-exports is in __all__.
    module = importlib.import_module(package.__name__)  # type: ignore[attr-defined]
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith(module.__name__ + ".")
    }
    assert public - set(names) == set()
