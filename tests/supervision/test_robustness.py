"""One child's policy never takes its supervisor down (issue 11, item 1), in virtual time."""

from __future__ import annotations

import trio
import trio.testing

from teisup.supervision import Backoff, ChildSpec, ChildState, Supervisor, SupervisorPhase

from .helpers import Probe, wait_for


class BrokenBackoff(Backoff, frozen=True):
    """A backoff whose computation fails: the worst a child's policy can do."""

    def delay(self, attempt: int) -> float:
        raise ArithmeticError("no delay today")


class NaNBackoff(Backoff, frozen=True):
    """A backoff that answers nonsense, which the supervisor's clock would refuse."""

    def delay(self, attempt: int) -> float:
        return float("nan")


async def test_a_subnormal_initial_and_a_huge_factor_back_off_to_the_cap(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The instance: maximum / initial overflows, factor**n overflows.
    bad, good = Probe(), Probe()
    sup = Supervisor(
        "instances",
        [
            ChildSpec("good", good),
            ChildSpec("bad", bad, backoff=Backoff(initial=5e-324, factor=1e300, maximum=60.0)),
        ],
        intensity=None,
    )
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        reasons = []
        for _ in range(4):
            bad.order("crash")
            reasons.append((await wait_for(events, "bad", ChildState.BACKOFF)).reason)
            await wait_for(events, "bad", ChildState.RUNNING)
    assert reasons == [
        "abnormal: RuntimeError: boom; restart in 4.94066e-324s",
        "abnormal: RuntimeError: boom; restart in 4.94066e-24s",
        "abnormal: RuntimeError: boom; restart in 60s",  # 1e300**2 would overflow
        "abnormal: RuntimeError: boom; restart in 60s",
    ]
    assert sup.phase is SupervisorPhase.RUNNING
    assert [c.state for c in sup.which_children()] == [ChildState.RUNNING, ChildState.RUNNING]
    assert good.starts == 1
    await sup.stop()


async def test_a_child_whose_policy_fails_is_that_childs_failure(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    for backoff, why in [
        (BrokenBackoff(), "ArithmeticError: no delay today"),
        (NaNBackoff(), "ValueError: backoff gave an invalid delay nan for restart 0"),
    ]:
        bad, good = Probe(), Probe()
        sup = Supervisor(
            "instances",
            [ChildSpec("good", good), ChildSpec("bad", bad, backoff=backoff)],
            intensity=None,
        )
        with sup.events.subscribe() as events:
            await nursery.start(sup.run)
            bad.order("crash")
            event = await wait_for(events, "bad", ChildState.FAILED)
        assert event.reason == f"abnormal: RuntimeError: boom; restart policy failed: {why}"
        # Its supervisor and its sibling carry on; the API still answers for it.
        assert sup.phase is SupervisorPhase.RUNNING
        assert [c.state for c in sup.which_children()] == [ChildState.RUNNING, ChildState.FAILED]
        assert good.starts == 1
        info = await sup.restart_child("bad")
        assert info.state is ChildState.RUNNING
        await sup.stop()
