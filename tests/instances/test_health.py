"""The readiness and liveness policy (pure)."""

from __future__ import annotations

import pytest

from teisup.instances.health import HealthPolicy, HealthSettings, Verdict


def policy(**kwargs: float) -> HealthPolicy:
    return HealthPolicy(HealthSettings(**kwargs), startup_timeout=60.0, started_at=100.0)  # type: ignore[arg-type]


def test_failures_while_starting_count_against_the_startup_budget_only() -> None:
    p = policy(failure_threshold=2)
    assert [p.on_probe(False, t, "refused") for t in (101, 102, 103, 104)] == [Verdict.WAIT] * 4
    assert p.consecutive_failures == 0
    assert p.on_probe(False, 160.0, "refused") is Verdict.STARTUP_TIMEOUT
    assert p.last_error == "refused"


def test_ready_then_degraded_then_restart_at_the_threshold() -> None:
    p = policy(failure_threshold=3)
    assert p.on_probe(True, 110.0) is Verdict.READY
    assert p.on_probe(True, 120.0) is Verdict.HEALTHY
    assert p.on_probe(False, 130.0, "timeout") is Verdict.DEGRADED
    assert p.on_probe(False, 140.0, "timeout") is Verdict.DEGRADED
    assert p.on_probe(False, 150.0, "timeout") is Verdict.RESTART
    assert p.consecutive_failures == 3


def test_a_success_resets_the_failure_count() -> None:
    p = policy(failure_threshold=2)
    p.on_probe(True, 101.0)
    assert p.on_probe(False, 102.0) is Verdict.DEGRADED
    assert p.on_probe(True, 103.0) is Verdict.HEALTHY
    assert p.on_probe(False, 104.0) is Verdict.DEGRADED
    assert p.last_success == 103.0


def test_probe_cadence_is_fast_while_starting_then_the_interval() -> None:
    p = policy(interval=10.0, ready_poll_interval=0.5)
    assert p.next_probe_after() == 0.5
    p.on_probe(True, 101.0)
    assert p.next_probe_after() == 10.0


def test_a_threshold_of_0_never_restarts() -> None:
    p = policy(failure_threshold=0)
    assert p.on_probe(True, 1.0) is Verdict.READY
    assert {p.on_probe(False, 2.0 + i) for i in range(100)} == {Verdict.DEGRADED}
    assert p.on_probe(True, 200.0) is Verdict.HEALTHY


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0.0}, "interval"),
        ({"timeout": -1.0}, "timeout"),
        ({"failure_threshold": -1}, "failure_threshold"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthSettings(**kwargs)  # type: ignore[arg-type]
