"""The child lifecycle table."""

from __future__ import annotations

import pytest

from teisup.supervision import ChildState, InvalidTransition, Lifecycle, Trigger
from teisup.supervision.lifecycle import TRANSITIONS


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(ChildState)


def test_the_ordinary_life_of_a_child() -> None:
    life = Lifecycle()
    steps = [
        (Trigger.START, ChildState.STARTING),
        (Trigger.STARTED, ChildState.RUNNING),
        (Trigger.RESTARTING, ChildState.BACKOFF),
        (Trigger.START, ChildState.STARTING),
        (Trigger.STARTED, ChildState.RUNNING),
        (Trigger.STOP, ChildState.STOPPING),
        (Trigger.TERMINATED, ChildState.STOPPED),
    ]
    for trigger, state in steps:
        old = life.state
        assert life.fire(trigger) == (old, state)


def test_health_reports_move_a_running_child_and_back() -> None:
    life = Lifecycle(ChildState.RUNNING)
    life.fire(Trigger.DEGRADED)
    assert life.state is ChildState.UNHEALTHY
    assert life.can_fire(Trigger.RESTARTING)
    life.fire(Trigger.RECOVERED)
    assert life.state is ChildState.RUNNING
    assert not Lifecycle(ChildState.STARTING).can_fire(Trigger.DEGRADED)


def test_failed_is_left_only_by_an_explicit_start() -> None:
    life = Lifecycle(ChildState.FAILED)
    for trigger in (Trigger.STARTED, Trigger.STOP, Trigger.RESTARTING, Trigger.EXITED):
        assert not life.can_fire(trigger)
    life.fire(Trigger.START)
    assert life.state is ChildState.STARTING


@pytest.mark.parametrize(
    ("state", "trigger"),
    [
        (ChildState.STOPPED, Trigger.STARTED),
        (ChildState.RUNNING, Trigger.START),
        (ChildState.STOPPING, Trigger.START),
        (ChildState.STOPPING, Trigger.RESTARTING),
    ],
)
def test_a_forbidden_trigger_raises_and_changes_nothing(
    state: ChildState, trigger: Trigger
) -> None:
    life = Lifecycle(state)
    with pytest.raises(InvalidTransition, match=trigger.value):
        life.fire(trigger)
    assert life.state is state


def test_active_states_are_the_ones_with_a_task() -> None:
    active = {s for s in ChildState if Lifecycle(s).active}
    assert active == {
        ChildState.STARTING,
        ChildState.RUNNING,
        ChildState.UNHEALTHY,
        ChildState.STOPPING,
    }
