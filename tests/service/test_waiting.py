"""``?wait=``: which wanted states can still be reached without a call."""

from __future__ import annotations

import itertools

import pytest

from teisup.api.waiting import WaitVerdict, wait_verdict
from teisup.supervision import ChildState

S = ChildState
REACHED, PENDING, UNREACHABLE = WaitVerdict.REACHED, WaitVerdict.PENDING, WaitVerdict.UNREACHABLE

#: (current, desired, wanted, verdict): what a user waiting would expect.
TABLE = [
    # Failed: its restarts are spent; only a start call moves it.
    (S.FAILED, "running", S.RUNNING, UNREACHABLE),
    (S.FAILED, "running", S.STOPPED, UNREACHABLE),
    (S.FAILED, "running", S.STARTING, UNREACHABLE),
    (S.FAILED, "running", S.FAILED, REACHED),
    # Stopped on request: stays stopped.
    (S.STOPPED, "stopped", S.RUNNING, UNREACHABLE),
    (S.STOPPED, "stopped", S.STARTING, UNREACHABLE),
    (S.STOPPED, "stopped", S.STOPPED, REACHED),
    # Stopped but wanted running: about to be started (creation, restore).
    (S.STOPPED, "running", S.RUNNING, PENDING),
    (S.STOPPED, "running", S.STARTING, PENDING),
    # On the way somewhere: any state may follow.
    (S.STARTING, "running", S.RUNNING, PENDING),
    (S.STARTING, "running", S.FAILED, PENDING),
    (S.BACKOFF, "running", S.RUNNING, PENDING),
    (S.BACKOFF, "running", S.FAILED, PENDING),
    (S.RUNNING, "running", S.STOPPED, PENDING),
    (S.RUNNING, "running", S.UNHEALTHY, PENDING),
    (S.UNHEALTHY, "running", S.RUNNING, PENDING),
    (S.STOPPING, "stopped", S.STOPPED, PENDING),
    (S.STOPPING, "running", S.RUNNING, PENDING),
    (S.RUNNING, "running", S.RUNNING, REACHED),
]


@pytest.mark.parametrize(("current", "desired", "wanted", "verdict"), TABLE)
def test_the_verdict_table(
    current: ChildState, desired: str, wanted: ChildState, verdict: WaitVerdict
) -> None:
    assert wait_verdict(current, desired, wanted) is verdict


@pytest.mark.parametrize(
    ("current", "desired", "wanted"),
    list(itertools.product(ChildState, ("running", "stopped"), ChildState)),
)
def test_only_the_wanted_state_is_reached_and_only_a_resting_instance_is_unreachable(
    current: ChildState, desired: str, wanted: ChildState
) -> None:
    verdict = wait_verdict(current, desired, wanted)
    assert (verdict is REACHED) == (current is wanted)
    if verdict is UNREACHABLE:
        assert current is S.FAILED or (current is S.STOPPED and desired == "stopped")
