"""The restart-group decision as a table: strategy x position x restart type x exit kind."""

from __future__ import annotations

import itertools

import pytest

from teisup.supervision import ChildState, ExitKind, RestartType, Strategy
from teisup.supervision.policy import GroupMember, RestartPlan, plan_restart

P, T, X = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY
N, S, A = ExitKind.NORMAL, ExitKind.SHUTDOWN, ExitKind.ABNORMAL
RUNNING = ChildState.RUNNING

#: (strategy, index of the exited child among a, b, c) -> (siblings stopped, then restarted)
GROUPS = {
    (Strategy.ONE_FOR_ONE, 0): ((), ()),
    (Strategy.ONE_FOR_ONE, 1): ((), ()),
    (Strategy.ONE_FOR_ONE, 2): ((), ()),
    (Strategy.ONE_FOR_ALL, 0): (("c", "b"), ("b", "c")),
    (Strategy.ONE_FOR_ALL, 1): (("c", "a"), ("a", "c")),
    (Strategy.ONE_FOR_ALL, 2): (("b", "a"), ("a", "b")),
    (Strategy.REST_FOR_ONE, 0): (("c", "b"), ("b", "c")),
    (Strategy.REST_FOR_ONE, 1): (("c",), ("c",)),
    (Strategy.REST_FOR_ONE, 2): ((), ()),
}

#: OTP: (restart type of the exited child, its exit kind) -> is it restarted
RESTARTED = {
    (P, N): True,
    (P, S): True,
    (P, A): True,
    (T, N): False,
    (T, S): False,
    (T, A): True,
    (X, N): False,
    (X, S): False,
    (X, A): False,
}


@pytest.mark.parametrize(
    ("strategy", "position", "restart", "kind"),
    list(itertools.product(Strategy, range(3), RestartType, ExitKind)),
    ids=lambda v: v.value if hasattr(v, "value") else str(v),
)
def test_the_restart_group(
    strategy: Strategy, position: int, restart: RestartType, kind: ExitKind
) -> None:
    ids = ["a", "b", "c"]
    children = [GroupMember(i, restart if n == position else P, RUNNING) for n, i in enumerate(ids)]
    plan = plan_restart(strategy, children, position, kind)
    if not RESTARTED[restart, kind]:
        # Nothing is touched; a temporary child that exited is forgotten.
        dropped = (ids[position],) if restart is X else ()
        assert plan == RestartPlan(restart=False, drop=dropped)
    else:
        stop, schedule = GROUPS[strategy, position]
        assert plan == RestartPlan(restart=True, stop=stop, schedule=schedule)


def test_siblings_are_treated_by_their_type_and_state() -> None:
    children = [
        GroupMember("p", P, ChildState.RUNNING),
        GroupMember("t", X, ChildState.RUNNING),
        GroupMember("x", P, ChildState.RUNNING),  # the one that exits
        GroupMember("f", P, ChildState.FAILED),
        GroupMember("s", T, ChildState.STOPPED),
        GroupMember("b", P, ChildState.BACKOFF),
        GroupMember("u", T, ChildState.UNHEALTHY),
    ]
    plan = plan_restart(Strategy.ONE_FOR_ALL, children, 2, A)
    # Stopped in reverse start order: those running and the one waiting to restart.
    assert plan.stop == ("u", "b", "t", "p")
    # Restarted with it in start order: every non-temporary sibling, stopped ones
    # too (OTP), but failed ones stay failed.
    assert plan.schedule == ("p", "s", "b", "u")
    # Temporary siblings are stopped and dropped.
    assert plan.drop == ("t",)
    assert plan.restart

    rest = plan_restart(Strategy.REST_FOR_ONE, children, 2, A)
    assert (rest.stop, rest.schedule, rest.drop) == (("u", "b"), ("s", "b", "u"), ())


def test_a_transient_exiting_normally_takes_no_sibling_along() -> None:
    children = [GroupMember("a", T, RUNNING), GroupMember("b", X, RUNNING)]
    assert plan_restart(Strategy.ONE_FOR_ALL, children, 0, N) == RestartPlan(restart=False)
