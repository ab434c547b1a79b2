"""No policy computation raises, whatever numbers a child's spec carries.

The numbers come from users (an instance's restart policy over the REST API),
so either the constructor refuses them with a ValueError naming the field, or
every computation on them returns a usable answer.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from teisup.supervision import (
    Backoff,
    ExitReason,
    GiveUp,
    Intensity,
    Restart,
    RestartTracker,
    RestartType,
    RestartWindow,
)

#: Every float (NaN, infinities, subnormals, the largest), and ints too big for one.
NUMBERS = st.floats() | st.integers(min_value=-(2**1100), max_value=2**1100)
ATTEMPTS = st.lists(st.integers(min_value=0, max_value=2**80), max_size=20)


@given(initial=NUMBERS, factor=NUMBERS, maximum=NUMBERS, reset_after=NUMBERS, attempts=ATTEMPTS)
@example(initial=5e-324, factor=1e300, maximum=60.0, reset_after=120.0, attempts=[2, 3, 10**9])
@example(initial=1e-300, factor=1.0000000000000002, maximum=1e300, reset_after=0.0, attempts=[])
@example(initial=1.0, factor=1.7e308, maximum=1.7e308, reset_after=1e308, attempts=[1, 2])
def test_a_backoff_is_refused_or_its_delays_are_sane(
    initial: float,
    factor: float,
    maximum: float,
    reset_after: float,
    attempts: list[int],
) -> None:
    try:
        backoff = Backoff(initial=initial, factor=factor, maximum=maximum, reset_after=reset_after)
    except ValueError:
        return
    streak = sorted({0, 1, 2, 64, 1100, 10**6, *attempts})
    delays = [backoff.delay(n) for n in streak]
    assert delays[0] == min(float(initial), float(maximum))
    for delay in delays:
        assert isinstance(delay, float)
        assert 0.0 <= delay <= float(maximum)  # the nearest float, for an int
    assert delays == sorted(delays)  # a longer streak never waits less


@given(initial=NUMBERS, factor=NUMBERS, maximum=NUMBERS)
@example(initial=5e-324, factor=1e300, maximum=60.0)
def test_a_tracker_decides_every_exit_of_a_crash_loop(
    initial: float, factor: float, maximum: float
) -> None:
    try:
        backoff = Backoff(initial=initial, factor=factor, maximum=maximum)
    except ValueError:
        return
    tracker = RestartTracker(RestartType.PERMANENT, backoff)
    now = 0.0
    for _ in range(50):
        decision = tracker.decide(ExitReason.abnormal("boom"), now=now, ran_for=0.0)
        assert isinstance(decision, Restart)
        assert math.isfinite(decision.delay)
        assert decision.at >= now  # never NaN; infinite only past the largest float
        now = decision.at


@given(
    max_restarts=NUMBERS | st.booleans() | st.none(),
    period=NUMBERS,
    times=st.lists(st.floats(allow_nan=False, min_value=-1e300, max_value=1e300), max_size=20),
)
def test_an_intensity_is_refused_or_its_window_counts(
    max_restarts: object, period: float, times: list[float]
) -> None:
    try:
        intensity = Intensity(max_restarts=max_restarts, period=period)  # type: ignore[arg-type]
    except ValueError:
        return
    window = RestartWindow(intensity)
    tracker = RestartTracker(RestartType.PERMANENT, Backoff(initial=0.0), intensity)
    for now in sorted(times):
        assert window.record(now) is (window.count(now) <= intensity.max_restarts)
        decision = tracker.decide(ExitReason.abnormal("boom"), now=now, ran_for=0.0)
        assert isinstance(decision, Restart | GiveUp)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial": 10**400}, "initial"),
        ({"factor": float("inf")}, "factor"),
        ({"maximum": "60"}, "maximum"),
        ({"reset_after": True}, "reset_after"),
    ],
)
def test_refusals_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(**kwargs)  # type: ignore[arg-type]
