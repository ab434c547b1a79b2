"""Introspection and the transition hook: snapshots, counts, events."""

from __future__ import annotations

import msgspec
import trio
import trio.testing

from teisup.supervision import (
    Backoff,
    ChildKind,
    ChildSpec,
    ChildState,
    Strategy,
    Supervisor,
    TransitionEvent,
    TreeNode,
)

from .helpers import Probe, drain, wait_for


async def two_level_tree(nursery: trio.Nursery) -> tuple[Supervisor, Probe]:
    worker = Probe(pid=1234)
    crashing = Probe()
    sub = Supervisor(
        "instances",
        [ChildSpec("bge-small", worker), ChildSpec("flaky", crashing, backoff=Backoff(initial=30))],
        strategy=Strategy.ONE_FOR_ONE,
        intensity=None,
    )
    root = Supervisor("root", [ChildSpec("instances", sub)], strategy=Strategy.REST_FOR_ONE)
    with root.events.subscribe() as events:
        await nursery.start(root.run)
        crashing.order("crash")
        await wait_for(events, "flaky", ChildState.BACKOFF)
    return root, worker


async def test_the_tree_snapshot_describes_every_node(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    root, _ = await two_level_tree(nursery)
    flaky = root.snapshot().children[0].children[1]
    assert (flaky.restarts_in_window, flaky.next_restart_in) == (1, 30)
    await trio.sleep(10)
    tree = root.snapshot()
    assert (tree.id, tree.kind, tree.state, tree.strategy) == (
        "root",
        ChildKind.SUPERVISOR,
        "running",
        Strategy.REST_FOR_ONE,
    )
    [instances] = tree.children
    assert (instances.kind, instances.state, instances.strategy) == (
        ChildKind.SUPERVISOR,
        "running",
        Strategy.ONE_FOR_ONE,
    )
    small, flaky = instances.children
    assert (small.state, small.pid, small.kind) == ("running", 1234, ChildKind.WORKER)
    assert small.uptime is not None
    assert small.uptime >= 10
    assert (flaky.state, flaky.pid, flaky.uptime) == ("backoff", None, None)
    # The restart fell out of the 5 s window; the backoff still has 20 s to go.
    assert flaky.restarts_in_window == 0
    assert flaky.next_restart_in == 20
    assert flaky.last_exit is not None
    assert "RuntimeError: boom" in flaky.last_exit.detail
    await root.stop()


async def test_the_tree_snapshot_round_trips_through_json(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    root, _ = await two_level_tree(nursery)
    tree = root.snapshot()
    encoded = msgspec.json.encode(tree)
    assert msgspec.json.decode(encoded, type=TreeNode) == tree
    # What an HTTP client sees: plain JSON with enum values as strings.
    plain = msgspec.json.decode(encoded)
    assert plain["children"][0]["children"][1]["state"] == "backoff"
    assert plain["children"][0]["children"][1]["last_exit"]["kind"] == "abnormal"
    await root.stop()


async def test_counts_and_statistics(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    root, _ = await two_level_tree(nursery)
    counts = root.count_children()
    assert (counts.specs, counts.active, counts.supervisors, counts.workers) == (1, 1, 1, 0)
    [instances] = root.which_children()
    assert instances.kind is ChildKind.SUPERVISOR
    stats = root.statistics()
    assert (stats.children, stats.active, stats.pending_restarts) == (1, 1, 0)
    await root.stop()


async def test_a_slow_subscriber_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    probes = [Probe() for _ in range(20)]
    sup = Supervisor("sup", [ChildSpec(f"w{i}", p) for i, p in enumerate(probes)])
    with sup.events.subscribe() as slow, sup.events.subscribe() as fast:
        seen_fast: list[TransitionEvent] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.stop()
            # The slow subscriber has read nothing yet; everything is queued for it.
            assert sup.events.statistics().max_backlog == 4 * len(probes)
            seen_fast = drain(fast)
        seen_slow = drain(slow)
    assert seen_slow == seen_fast
    assert len(seen_slow) == sup.events.statistics().published == 4 * len(probes)
    assert sup.events.statistics().subscribers == 0
    # Times are the Trio clock's (monotonic, virtual here), never wall-clock.
    assert all(e.time <= trio.current_time() for e in seen_slow)
    assert [e.new for e in seen_slow[:2]] == [ChildState.STARTING, ChildState.RUNNING]


async def test_events_encode_to_json() -> None:
    event = TransitionEvent(("root", "w"), ChildState.RUNNING, ChildState.BACKOFF, "boom", 1.5)
    assert msgspec.json.decode(msgspec.json.encode(event)) == {
        "path": ["root", "w"],
        "old": "running",
        "new": "backoff",
        "reason": "boom",
        "time": 1.5,
    }
