"""Restarts by reason come from each run's typed exit cause, not from its prose."""

from __future__ import annotations

import signal

import pytest

from teisup.instances import ExitCause, InstanceExit
from teisup.service.metrics import Metrics
from teisup.supervision import ChildState, TransitionEvent

CAUSES = {
    "exits": InstanceExit.of_returncode(0),
    "crashes": InstanceExit.of_returncode(3, "Error: boom"),
    "is-killed": InstanceExit.of_returncode(-signal.SIGKILL),
    "hangs": InstanceExit(ExitCause.UNHEALTHY, "3 checks failed"),
    "is-slow": InstanceExit(ExitCause.STARTUP_TIMEOUT, "late"),
    "lost-its-port": InstanceExit(ExitCause.PORT_TAKEN, "port 8080 is held", port=8080),
    "cannot-spawn": InstanceExit(ExitCause.SPAWN_FAILED, "no such file"),
}


def restart(name: str, reason: str = "abnormal: unhealthy: misleading prose") -> TransitionEvent:
    return TransitionEvent(
        ("root", "instances", name), ChildState.RUNNING, ChildState.BACKOFF, reason, 1.0
    )


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("exits", "exit"),
        ("crashes", "crash"),
        ("is-killed", "signal"),
        ("hangs", "unhealthy"),
        ("is-slow", "startup_timeout"),
        ("lost-its-port", "crash"),
        ("cannot-spawn", "crash"),
        ("unknown", "other"),
    ],
)
def test_each_cause_has_its_label_whatever_the_reason_text_says(name: str, label: str) -> None:
    metrics = Metrics(instances=list, gpus=list, exit_cause=CAUSES.get)
    metrics.on_transition(restart(name))
    text = metrics.render().decode()
    assert (
        f'teisup_instance_restarts_by_reason_total{{instance="{name}",reason="{label}"}} 1.0'
        in (text)
    )
    assert f'tei_manager_instance_restarts_total{{instance="{name}"}} 1.0' in text


def test_only_an_instance_entering_backoff_counts() -> None:
    metrics = Metrics(instances=list, gpus=list, exit_cause=CAUSES.get)
    metrics.on_transition(
        TransitionEvent(
            ("root", "instances", "crashes"), ChildState.RUNNING, ChildState.STOPPED, "", 1
        )
    )
    metrics.on_transition(
        TransitionEvent(("root", "api"), ChildState.RUNNING, ChildState.BACKOFF, "", 1)
    )
    assert "teisup_instance_restarts_by_reason_total{" not in metrics.render().decode()
