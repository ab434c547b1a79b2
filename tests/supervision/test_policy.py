"""The pure restart policy: OTP's rules, the window, the backoff, give-up."""

from __future__ import annotations

import msgspec
import pytest

from teisup.supervision import (
    Backoff,
    ExitKind,
    ExitReason,
    GiveUp,
    Intensity,
    NoRestart,
    Restart,
    RestartTracker,
    RestartType,
    RestartWindow,
    should_restart,
)

P, T, X = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY
N, S, A = ExitKind.NORMAL, ExitKind.SHUTDOWN, ExitKind.ABNORMAL


@pytest.mark.parametrize(
    ("restart", "exit_kind", "expected"),
    [
        (P, N, True),
        (P, S, True),
        (P, A, True),
        (T, N, False),
        (T, S, False),
        (T, A, True),
        (X, N, False),
        (X, S, False),
        (X, A, False),
    ],
)
def test_otp_restart_rule(restart: RestartType, exit_kind: ExitKind, expected: bool) -> None:
    assert should_restart(restart, exit_kind) is expected


def test_window_follows_otp_add_restart() -> None:
    # OTP's default 1 restart in 5 s: the second restart within 5 s is refused.
    window = RestartWindow(Intensity(max_restarts=1, period=5.0))
    assert window.record(100.0)
    assert not window.record(104.0)
    # Restarts older than the period fall out of the window.
    window.reset()
    assert window.record(100.0)
    assert window.record(105.5)
    assert window.count(105.5) == 1


def test_window_with_zero_intensity_refuses_every_restart() -> None:
    assert not RestartWindow(Intensity(max_restarts=0, period=1.0)).record(0.0)


def test_backoff_doubles_to_its_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=60.0)
    assert [backoff.delay(n) for n in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    # No overflow however long the streak.
    assert backoff.delay(10**6) == 60.0


def test_backoff_zero_initial_restarts_immediately() -> None:
    assert Backoff(initial=0.0).delay(50) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1.0}, "initial"),
        ({"factor": 0.5}, "factor"),
        ({"initial": 10.0, "maximum": 5.0}, "maximum"),
        ({"reset_after": float("nan")}, "reset_after"),
    ],
)
def test_backoff_rejects_bad_values(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_restarts": -1}, "max_restarts"), ({"period": 0.0}, "period")],
)
def test_intensity_rejects_bad_values(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Intensity(**kwargs)  # type: ignore[arg-type]


def test_policy_structs_decode_with_validation() -> None:
    assert msgspec.json.decode(b'{"initial": 0.5}', type=Backoff) == Backoff(initial=0.5)
    with pytest.raises(msgspec.ValidationError, match="factor"):
        msgspec.json.decode(b'{"factor": 0}', type=Backoff)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"max_restart": 3}', type=Intensity)


CRASH = ExitReason.abnormal("boom")


def test_tracker_schedules_capped_backoff_and_resets_after_a_healthy_run() -> None:
    tracker = RestartTracker(P, Backoff(initial=1.0, maximum=8.0, reset_after=100.0))
    now, delays = 0.0, []
    for _ in range(6):
        decision = tracker.decide(CRASH, now=now, ran_for=1.0)
        assert isinstance(decision, Restart)
        assert decision.at == now + decision.delay
        delays.append(decision.delay)
        now = decision.at + 1.0
    assert delays == [1, 2, 4, 8, 8, 8]
    # A run as long as reset_after starts the streak over.
    decision = tracker.decide(CRASH, now=now + 100.0, ran_for=100.0)
    assert decision == Restart(delay=1.0, at=now + 101.0)


def test_tracker_gives_up_past_its_own_intensity() -> None:
    tracker = RestartTracker(P, Backoff(initial=0.0), Intensity(max_restarts=2, period=60.0))
    assert isinstance(tracker.decide(CRASH, now=0.0, ran_for=0.0), Restart)
    assert isinstance(tracker.decide(CRASH, now=1.0, ran_for=0.0), Restart)
    assert tracker.decide(CRASH, now=2.0, ran_for=0.0) == GiveUp(restarts=2, period=60.0)
    tracker.reset()
    assert tracker.streak == 0
    assert tracker.restarts_in_window(2.0) == 0
    assert isinstance(tracker.decide(CRASH, now=3.0, ran_for=0.0), Restart)


def test_tracker_says_no_restart_when_the_type_forbids_it() -> None:
    tracker = RestartTracker(T, Backoff())
    decision = tracker.decide(ExitReason.normal(), now=0.0, ran_for=5.0)
    assert isinstance(decision, NoRestart)
    assert "transient" in decision.reason
    # A refused restart does not count in the window or the streak.
    assert tracker.restarts_in_window(0.0) == 0
    assert tracker.streak == 0


def test_exit_reason_text() -> None:
    assert str(ExitReason.normal()) == "normal"
    assert str(ExitReason.abnormal("exit code 3")) == "abnormal: exit code 3"


def test_a_permanent_error_is_not_retried_and_spends_no_budget() -> None:
    tracker = RestartTracker(P, Backoff(initial=0.0), Intensity(max_restarts=5, period=60.0))
    assert isinstance(tracker.decide(CRASH, now=0.0, ran_for=0.0), Restart)
    hopeless = ExitReason(ExitKind.ABNORMAL, "model not available offline", permanent=True)
    assert tracker.decide(hopeless, now=1.0, ran_for=0.0) == GiveUp(
        restarts=1, period=60.0, permanent=True
    )
    assert tracker.restarts_in_window(1.0) == 1
