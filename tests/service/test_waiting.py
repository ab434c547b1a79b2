"""``?wait=``: which wanted states can still be reached without a call."""

from __future__ import annotations

import itertools

import pytest

from teisup.api.waiting import WaitVerdict, wait_verdict
from teisup.instances import Desired
from teisup.supervision import ChildState

S = ChildState
RUN, STOP = Desired.RUNNING, Desired.STOPPED
REACHED, PENDING, UNREACHABLE = WaitVerdict.REACHED, WaitVerdict.PENDING, WaitVerdict.UNREACHABLE

#: (current, desired, wanted, verdict): what a user waiting would expect.
TABLE = [
    # Failed: its restarts are spent; only a start call moves it.
    (S.FAILED, RUN, S.RUNNING, UNREACHABLE),
    (S.FAILED, RUN, S.STOPPED, UNREACHABLE),
    (S.FAILED, RUN, S.STARTING, UNREACHABLE),
    (S.FAILED, RUN, S.FAILED, REACHED),
    # Stopped on request: stays stopped.
    (S.STOPPED, STOP, S.RUNNING, UNREACHABLE),
    (S.STOPPED, STOP, S.STARTING, UNREACHABLE),
    (S.STOPPED, STOP, S.STOPPED, REACHED),
    # Stopped but wanted running: about to be started (creation, restore).
    (S.STOPPED, RUN, S.RUNNING, PENDING),
    (S.STOPPED, RUN, S.STARTING, PENDING),
    # On the way somewhere: any state may follow.
    (S.STARTING, RUN, S.RUNNING, PENDING),
    (S.STARTING, RUN, S.FAILED, PENDING),
    (S.BACKOFF, RUN, S.RUNNING, PENDING),
    (S.BACKOFF, RUN, S.FAILED, PENDING),
    (S.RUNNING, RUN, S.STOPPED, PENDING),
    (S.RUNNING, RUN, S.UNHEALTHY, PENDING),
    (S.UNHEALTHY, RUN, S.RUNNING, PENDING),
    (S.STOPPING, STOP, S.STOPPED, PENDING),
    (S.STOPPING, RUN, S.RUNNING, PENDING),
    (S.RUNNING, RUN, S.RUNNING, REACHED),
]


@pytest.mark.parametrize(("current", "desired", "wanted", "verdict"), TABLE)
def test_the_verdict_table(
    current: ChildState, desired: Desired, wanted: ChildState, verdict: WaitVerdict
) -> None:
    assert wait_verdict(current, desired, wanted) is verdict


@pytest.mark.parametrize(
    ("current", "desired", "wanted"),
    list(itertools.product(ChildState, Desired, ChildState)),
)
def test_only_the_wanted_state_is_reached_and_only_a_resting_instance_is_unreachable(
    current: ChildState, desired: Desired, wanted: ChildState
) -> None:
    verdict = wait_verdict(current, desired, wanted)
    assert (verdict is REACHED) == (current is wanted)
    if verdict is UNREACHABLE:
        assert current is S.FAILED or (current is S.STOPPED and desired is STOP)
