"""How a supervisor stops all its children: serial in reverse order, or in parallel."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from teisup.supervision import (
    INFINITY,
    Backoff,
    ChildSpec,
    ChildState,
    Supervisor,
    SupervisorPhase,
)

from .helpers import Probe, drain, moves

#: Graces in start order; the stubborn children ignore their stop request.
GRACES = [3.0, 1.0, 5.0, 2.0, 4.0]


async def stubborn_instances(
    nursery: trio.Nursery, *, parallel_shutdown: bool
) -> tuple[Supervisor, list[Probe]]:
    sup = Supervisor("instances", intensity=None, parallel_shutdown=parallel_shutdown)
    await nursery.start(sup.run)
    probes = [Probe(obey_stop=False) for _ in GRACES]
    for n, (probe, grace) in enumerate(zip(probes, GRACES, strict=True)):
        await sup.start_child(ChildSpec(f"i{n}", probe, shutdown=grace, backoff=Backoff(0.0)))
    return sup, probes


async def test_a_parallel_shutdown_takes_the_longest_grace_not_the_sum(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await stubborn_instances(nursery, parallel_shutdown=True)
    with sup.events.subscribe() as events:
        began = trio.current_time()
        await sup.stop()
        took = trio.current_time() - began
        seen = moves(drain(events))
    assert took == pytest.approx(max(GRACES))
    # Every child is asked to stop (in reverse start order) before any is
    # cancelled; they are then cancelled as their own graces run out.
    assert seen == [
        ("i4", "stopping"),
        ("i3", "stopping"),
        ("i2", "stopping"),
        ("i1", "stopping"),
        ("i0", "stopping"),
        ("i1", "stopped"),
        ("i3", "stopped"),
        ("i0", "stopped"),
        ("i4", "stopped"),
        ("i2", "stopped"),
    ]
    assert all((p.saw_stop_request, p.cancelled) == (1, 1) for p in probes)
    for node in sup.snapshot().children:
        assert node.last_exit is not None
        assert node.last_exit.detail == "supervisor stopping; killed"


async def test_a_serial_shutdown_stops_one_child_after_the_other(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await stubborn_instances(nursery, parallel_shutdown=False)
    with sup.events.subscribe() as events:
        began = trio.current_time()
        await sup.stop()
        took = trio.current_time() - began
        seen = moves(drain(events))
    assert took == pytest.approx(sum(GRACES))
    assert seen == [
        (f"i{n}", state) for n in reversed(range(5)) for state in ("stopping", "stopped")
    ]
    assert all((p.saw_stop_request, p.cancelled) == (1, 1) for p in probes)


async def test_a_parallel_shutdown_waits_for_children_that_stop_in_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    quick, slow, backing_off = Probe(stop_delay=0.5), Probe(stop_delay=2.0), Probe()
    sup = Supervisor(
        "instances",
        [
            ChildSpec("quick", quick, shutdown=10.0),
            ChildSpec("slow", slow, shutdown=INFINITY),
            ChildSpec("waiting", backing_off, backoff=Backoff(initial=30.0)),
        ],
        parallel_shutdown=True,
    )
    await nursery.start(sup.run)
    with sup.events.subscribe() as events:
        backing_off.order("crash")
        while (await events.receive()).new is not ChildState.BACKOFF:
            pass
        began = trio.current_time()
        await sup.stop()
        took = trio.current_time() - began
        seen = moves(drain(events))
    assert took == pytest.approx(2.0)
    assert seen == [
        ("waiting", "stopped"),  # it only stops waiting
        ("slow", "stopping"),
        ("quick", "stopping"),
        ("quick", "stopped"),
        ("slow", "stopped"),
    ]
    assert (quick.cancelled, slow.cancelled) == (0, 0)
    assert [c.state for c in sup.which_children()] == [ChildState.STOPPED] * 3


async def test_cancelling_a_parallel_shutdown_midway_leaves_no_child_reported_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            sup, probes = await stubborn_instances(nursery, parallel_shutdown=True)
            with sup.events.subscribe() as events:
                began = trio.current_time()
                nursery.start_soon(sup.stop)
                async for event in events:
                    if event.new is ChildState.STOPPED:  # the first grace (1 s) ran out
                        outer.cancel()
                        break
    assert trio.current_time() - began == pytest.approx(min(GRACES))
    assert [c.state for c in sup.which_children()] == [ChildState.STOPPED] * 5
    assert all(p.cancelled == 1 for p in probes)
    assert sup.phase is SupervisorPhase.STOPPED
