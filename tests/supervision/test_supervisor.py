"""The supervisor runtime, in virtual time: every test takes ``autojump_clock``."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from teisup.supervision import (
    BRUTAL_KILL,
    INFINITY,
    Backoff,
    ChildContext,
    ChildRunningError,
    ChildSpec,
    ChildStartError,
    ChildState,
    DuplicateChildError,
    ExitKind,
    Intensity,
    MaxChildrenError,
    RestartIntensityExceeded,
    RestartType,
    Strategy,
    Supervisor,
    SupervisorNotRunning,
    SupervisorPhase,
    SupervisorStartError,
    TransitionEvent,
    UnknownChildError,
)

from .helpers import Probe, drain, moves, wait_for, wait_for_exit

FAST = Backoff(initial=0.0)


def spec(id: str, probe: Probe, **kwargs: object) -> ChildSpec:
    kwargs.setdefault("backoff", FAST)
    return ChildSpec(id, probe, **kwargs)  # type: ignore[arg-type]


# -- the OTP matrix: restart type x exit reason ------------------------------------

ORDERS = {"normal": ExitKind.NORMAL, "shutdown": ExitKind.SHUTDOWN, "crash": ExitKind.ABNORMAL}


@pytest.mark.parametrize(
    ("restart", "order", "restarted"),
    [
        (RestartType.PERMANENT, "normal", True),
        (RestartType.PERMANENT, "shutdown", True),
        (RestartType.PERMANENT, "crash", True),
        (RestartType.TRANSIENT, "normal", False),
        (RestartType.TRANSIENT, "shutdown", False),
        (RestartType.TRANSIENT, "crash", True),
        (RestartType.TEMPORARY, "normal", False),
        (RestartType.TEMPORARY, "shutdown", False),
        (RestartType.TEMPORARY, "crash", False),
    ],
)
async def test_otp_restart_matrix(
    nursery: trio.Nursery,
    restart: RestartType,
    order: str,
    restarted: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    sup = Supervisor("sup", [spec("w", probe, restart=restart)])
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        probe.order(order)
        event = await wait_for_exit(events, "w")
        if restarted:
            assert event.new is ChildState.BACKOFF
            await wait_for(events, "w", ChildState.RUNNING)
            assert probe.starts == 2
            assert sup.which_children()[0].state is ChildState.RUNNING
        else:
            assert event.new is ChildState.STOPPED
            assert probe.starts == 1
            children = sup.which_children()
            if restart is RestartType.TEMPORARY:
                assert children == []  # a temporary child's spec goes with it
            else:
                assert [c.state for c in children] == [ChildState.STOPPED]
                assert sup.snapshot().children[0].last_exit.kind is ORDERS[order]  # type: ignore[union-attr]
    await sup.stop()


# -- strategies -----------------------------------------------------------------


async def three_children(
    nursery: trio.Nursery, strategy: Strategy, **b_kwargs: object
) -> tuple[Supervisor, dict[str, Probe]]:
    probes = {name: Probe() for name in "abc"}
    sup = Supervisor(
        "sup",
        [
            spec("a", probes["a"]),
            spec("b", probes["b"], **b_kwargs),
            spec("c", probes["c"]),
        ],
        strategy=strategy,
    )
    await nursery.start(sup.run)
    return sup, probes


async def test_one_for_one_restarts_only_the_failed_child(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await three_children(nursery, Strategy.ONE_FOR_ONE)
    with sup.events.subscribe() as events:
        probes["b"].order("crash")
        await wait_for(events, "b", ChildState.RUNNING)
        assert {n: p.starts for n, p in probes.items()} == {"a": 1, "b": 2, "c": 1}
        assert moves(drain(events)) == []
    await sup.stop()


async def test_one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await three_children(nursery, Strategy.ONE_FOR_ALL)
    with sup.events.subscribe() as events:
        probes["b"].order("crash")
        consumed: list[TransitionEvent] = []
        await wait_for(events, "c", ChildState.RUNNING, consumed)
        seen = moves(consumed)
    assert {n: p.starts for n, p in probes.items()} == {"a": 2, "b": 2, "c": 2}
    assert [m for m in seen if m[1] == "stopping"] == [("c", "stopping"), ("a", "stopping")]
    assert [m[0] for m in seen if m[1] == "starting"] == ["a", "b", "c"]
    await sup.stop()


async def test_rest_for_one_restarts_the_failed_child_and_those_after_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await three_children(nursery, Strategy.REST_FOR_ONE)
    with sup.events.subscribe() as events:
        probes["b"].order("crash")
        consumed: list[TransitionEvent] = []
        await wait_for(events, "c", ChildState.RUNNING, consumed)
        seen = moves(consumed)
    assert {n: p.starts for n, p in probes.items()} == {"a": 1, "b": 2, "c": 2}
    assert [m[0] for m in seen if m[1] == "starting"] == ["b", "c"]
    await sup.stop()


async def test_a_temporary_sibling_is_stopped_and_dropped_by_a_group_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probes = {"t": Probe(), "p": Probe()}
    sup = Supervisor(
        "sup",
        [spec("t", probes["t"], restart=RestartType.TEMPORARY), spec("p", probes["p"])],
        strategy=Strategy.ONE_FOR_ALL,
    )
    await nursery.start(sup.run)
    with sup.events.subscribe() as events:
        probes["p"].order("crash")
        await wait_for(events, "p", ChildState.RUNNING)
    assert [c.id for c in sup.which_children()] == ["p"]
    assert probes["t"].starts == 1
    await sup.stop()


async def test_a_transient_exit_that_needs_no_restart_leaves_siblings_alone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, probes = await three_children(nursery, Strategy.ONE_FOR_ALL, restart=RestartType.TRANSIENT)
    with sup.events.subscribe() as events:
        probes["b"].order("normal")
        await wait_for(events, "b", ChildState.STOPPED)
        await trio.testing.wait_all_tasks_blocked()
        assert moves(drain(events)) == []
    assert [c.state.value for c in sup.which_children()] == ["running", "stopped", "running"]
    await sup.stop()


# -- intensity and escalation ---------------------------------------------------


async def test_exceeding_intensity_stops_children_in_reverse_and_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probes = {name: Probe() for name in "abc"}
    sup = Supervisor(
        "sup",
        [spec(n, p) for n, p in probes.items()],
        intensity=Intensity(max_restarts=1, period=5.0),
    )

    async def crash_b_twice() -> None:
        await wait_for(events, "c", ChildState.RUNNING)
        probes["b"].order("crash")
        await wait_for(events, "b", ChildState.RUNNING)
        probes["b"].order("crash")

    with sup.events.subscribe() as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_b_twice)
            # run() raises the error itself, not wrapped in an exception group.
            with pytest.raises(RestartIntensityExceeded, match=r"more than 1 restarts within 5.0s"):
                await sup.run()
        seen = moves(drain(events))
    assert seen[-4:] == [("c", "stopping"), ("c", "stopped"), ("a", "stopping"), ("a", "stopped")]
    assert sup.phase is SupervisorPhase.FAILED
    assert all(c.state is ChildState.STOPPED for c in sup.which_children())


async def test_a_sub_supervisor_that_gives_up_is_restarted_by_its_parent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    worker, sibling = Probe(), Probe()
    sub = Supervisor("sub", [spec("w", worker)], intensity=Intensity(max_restarts=0, period=5.0))
    root = Supervisor("root", [spec("sibling", sibling), spec("sub", sub)])  # type: ignore[arg-type]
    await nursery.start(root.run)
    with root.events.subscribe() as events:
        worker.order("crash")
        event = await wait_for(events, "sub", ChildState.BACKOFF)
        assert event.path == ("root", "sub")
        assert "RestartIntensityExceeded" in event.reason
        await wait_for(events, "sub", ChildState.RUNNING)
    # The sub-tree came back from its specs; the parent's other child never noticed.
    assert worker.starts == 2
    assert sibling.starts == 1
    assert sub.phase is SupervisorPhase.RUNNING
    await root.stop()
    assert sub.phase is SupervisorPhase.STOPPED


async def test_escalation_climbs_to_the_root(autojump_clock: trio.testing.MockClock) -> None:
    worker = Probe()
    sub = Supervisor("sub", [spec("w", worker)], intensity=Intensity(max_restarts=0, period=5.0))
    root = Supervisor(
        "root",
        [ChildSpec("sub", sub, backoff=FAST)],
        intensity=Intensity(max_restarts=0, period=5.0),
    )

    async def crash_worker() -> None:
        await wait_for(events, "w", ChildState.RUNNING)
        worker.order("crash")

    with root.events.subscribe() as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_worker)
            with pytest.raises(RestartIntensityExceeded, match="'root'"):
                await root.run()
    assert root.phase is SupervisorPhase.FAILED
    assert sub.phase is SupervisorPhase.FAILED


async def test_events_from_a_sub_tree_carry_the_full_path(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    worker = Probe()
    root = Supervisor("root", [ChildSpec("sub", Supervisor("sub", [spec("w", worker)]))])
    with root.events.subscribe() as events:
        await nursery.start(root.run)
        event = await wait_for(events, "w", ChildState.RUNNING)
    assert event.path == ("root", "sub", "w")
    await root.stop()


# -- shutdown specs and order -----------------------------------------------------


async def test_graceful_shutdown_that_times_out_cancels_the_child(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    stubborn = Probe(obey_stop=False)
    sup = Supervisor("sup", [spec("w", stubborn, shutdown=2.5)])
    await nursery.start(sup.run)
    before = trio.current_time()
    await sup.terminate_child("w")
    assert trio.current_time() - before == pytest.approx(2.5)
    assert stubborn.saw_stop_request == 1
    assert stubborn.cancelled == 1
    node = sup.snapshot().children[0]
    assert node.state == "stopped"
    assert node.last_exit is not None
    assert node.last_exit.kind is ExitKind.SHUTDOWN
    assert "killed" in node.last_exit.detail
    await sup.stop()


async def test_graceful_shutdown_within_the_grace_does_not_cancel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    polite = Probe(stop_delay=1.0)
    sup = Supervisor("sup", [spec("w", polite, shutdown=2.5)])
    await nursery.start(sup.run)
    before = trio.current_time()
    await sup.terminate_child("w")
    assert trio.current_time() - before == pytest.approx(1.0)
    assert polite.cancelled == 0
    assert "killed" not in sup.snapshot().children[0].last_exit.detail  # type: ignore[union-attr]
    await sup.stop()


async def test_brutal_kill_cancels_without_a_stop_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = Probe()
    sup = Supervisor("sup", [spec("w", probe, shutdown=BRUTAL_KILL)])
    await nursery.start(sup.run)
    before = trio.current_time()
    await sup.terminate_child("w")
    assert trio.current_time() == before
    assert (probe.saw_stop_request, probe.cancelled) == (0, 1)
    await sup.stop()


async def test_infinity_waits_as_long_as_the_child_takes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    slow = Probe(stop_delay=3600.0)
    sup = Supervisor("sup", [spec("w", slow, shutdown=INFINITY)])
    await nursery.start(sup.run)
    before = trio.current_time()
    await sup.terminate_child("w")
    assert trio.current_time() - before == pytest.approx(3600.0)
    assert slow.cancelled == 0
    await sup.stop()


async def test_stop_shuts_children_down_in_reverse_start_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup, _ = await three_children(nursery, Strategy.ONE_FOR_ONE)
    with sup.events.subscribe() as events:
        await sup.stop()
        seen = moves(drain(events))
    assert seen == [
        ("c", "stopping"),
        ("c", "stopped"),
        ("b", "stopping"),
        ("b", "stopped"),
        ("a", "stopping"),
        ("a", "stopped"),
    ]
    assert sup.phase is SupervisorPhase.STOPPED


async def test_outside_cancellation_leaves_no_child_reported_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    sup = Supervisor("sup", [spec("w", probe)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.cancel_scope.cancel()
    assert probe.cancelled == 1
    assert [c.state for c in sup.which_children()] == [ChildState.STOPPED]
    assert sup.phase is SupervisorPhase.STOPPED


# -- dynamic children -------------------------------------------------------------


async def test_dynamic_children_are_added_restarted_stopped_and_deleted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor("sup", [spec("a", Probe())])
    await nursery.start(sup.run)
    extra = Probe(pid=4242)
    info = await sup.start_child(spec("extra", extra))
    assert (info.id, info.state, info.pid) == ("extra", ChildState.RUNNING, 4242)
    assert [c.id for c in sup.which_children()] == ["a", "extra"]
    assert sup.count_children().specs == 2

    with pytest.raises(DuplicateChildError, match="'extra'"):
        await sup.start_child(spec("extra", Probe()))
    with pytest.raises(ChildRunningError, match="terminate it"):
        await sup.delete_child("extra")

    await sup.restart_child("extra")
    assert extra.starts == 2

    await sup.terminate_child("extra")
    await sup.terminate_child("extra")  # stopping a stopped child is a no-op
    counts = sup.count_children()
    assert (counts.specs, counts.active, counts.workers, counts.supervisors) == (2, 1, 2, 0)
    await sup.delete_child("extra")
    assert [c.id for c in sup.which_children()] == ["a"]
    with pytest.raises(UnknownChildError, match="'extra'"):
        await sup.terminate_child("extra")
    await sup.stop()


async def test_max_children_is_refused_with_a_clear_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor("instances", max_children=2)
    await nursery.start(sup.run)
    await sup.start_child(spec("one", Probe()))
    await sup.start_child(spec("two", Probe()))
    with pytest.raises(MaxChildrenError, match=r"max_children=2.*'three'"):
        await sup.start_child(spec("three", Probe()))
    assert sup.count_children().specs == 2
    await sup.stop()


async def test_a_dynamic_child_that_fails_to_start_is_not_kept(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor("sup")
    await nursery.start(sup.run)
    with pytest.raises(ChildStartError, match="cannot start") as caught:
        await sup.start_child(spec("bad", Probe(fail_start=True)))
    assert caught.value.exit.kind is ExitKind.ABNORMAL
    assert sup.which_children() == []
    await sup.stop()


async def test_a_static_child_that_fails_to_start_fails_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, bad, never = Probe(), Probe(fail_start=True), Probe()
    sup = Supervisor("sup", [spec("first", first), spec("bad", bad), spec("never", never)])
    with sup.events.subscribe() as events:
        async with trio.open_nursery() as nursery:
            with pytest.raises(SupervisorStartError, match="'bad' failed to start"):
                await nursery.start(sup.run)
        seen = moves(drain(events))
    assert ("first", "stopped") in seen
    assert never.starts == 0
    assert sup.phase is SupervisorPhase.FAILED


async def test_the_api_refuses_work_when_the_supervisor_is_not_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor("sup")
    with pytest.raises(SupervisorNotRunning, match="idle"):
        await sup.start_child(spec("w", Probe()))
    await sup.stop()  # stopping an idle supervisor is a no-op


async def test_a_supervisor_runs_once_at_a_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor("sup")
    await nursery.start(sup.run)
    with pytest.raises(RuntimeError, match="already running"):
        await sup.run()
    await sup.stop()


def test_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="id"):
        ChildSpec("bad id", Probe())
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec("w", Probe(), shutdown=-1.0)
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec("w", Probe(), shutdown="later")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="start"):
        ChildSpec("w", "not callable")  # type: ignore[arg-type]
    with pytest.raises(DuplicateChildError):
        Supervisor("sup", [ChildSpec("w", Probe()), ChildSpec("w", Probe())])
    with pytest.raises(MaxChildrenError):
        Supervisor("sup", [ChildSpec("w", Probe())], max_children=0)


# -- backoff and give-up in virtual time ---------------------------------------------


async def test_backoff_spaces_restarts_and_resets_after_a_healthy_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = Probe()
    backoff = Backoff(initial=1.0, factor=2.0, maximum=8.0, reset_after=60.0)
    sup = Supervisor("sup", [ChildSpec("w", probe, backoff=backoff)], intensity=None)
    await nursery.start(sup.run)
    starts = []
    with sup.events.subscribe() as events:
        for _ in range(6):
            probe.order("crash")
            await wait_for(events, "w", ChildState.BACKOFF)
            node = sup.snapshot().children[0]
            assert node.next_restart_in is not None
            assert node.next_restart_at == pytest.approx(trio.current_time() + node.next_restart_in)
            starts.append((await wait_for(events, "w", ChildState.STARTING)).time)
        # A healthy run of reset_after seconds forgives the streak.
        await trio.sleep(60.0)
        crashed_at = trio.current_time()
        probe.order("crash")
        restarted_at = (await wait_for(events, "w", ChildState.STARTING)).time
    gaps = [round(b - a) for a, b in itertools.pairwise(starts)]
    assert gaps == [2, 4, 8, 8, 8]
    assert restarted_at - crashed_at == pytest.approx(1.0)
    await sup.stop()


async def test_a_crash_loop_gives_up_and_an_explicit_restart_brings_it_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = Probe()
    # Five restarts within ten minutes, backoff 1 s doubling to 60 s: ten virtual
    # minutes of crash loop run in milliseconds.
    child = ChildSpec(
        "w",
        probe,
        backoff=Backoff(initial=1.0, maximum=60.0),
        intensity=Intensity(max_restarts=5, period=600.0),
    )
    sup = Supervisor("sup", [child], intensity=None)
    await nursery.start(sup.run)
    began = trio.current_time()
    with sup.events.subscribe() as events:
        while True:
            probe.order("crash")
            event = await wait_for_exit(events, "w")
            if event.new is ChildState.FAILED:
                break
            await wait_for(events, "w", ChildState.RUNNING)
    assert probe.starts == 6
    assert trio.current_time() - began == pytest.approx(1 + 2 + 4 + 8 + 16)
    assert "gave up after 5 restarts within 600.0s" in event.reason
    node = sup.snapshot().children[0]
    assert (node.state, node.restarts_in_window) == ("failed", 5)

    await sup.restart_child("w")
    node = sup.snapshot().children[0]
    assert (node.state, node.restarts_in_window) == ("running", 0)
    await sup.stop()


async def test_a_failing_restart_counts_as_another_exit(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    attempts = 0

    async def flaky(ctx: ChildContext) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            raise RuntimeError("cannot start this time")
        ctx.started()
        if attempts == 1:
            raise RuntimeError("crash after start")
        await ctx.wait_stop_requested()

    sup = Supervisor("sup", [ChildSpec("w", flaky, backoff=FAST)], intensity=None)
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        await wait_for(events, "w", ChildState.BACKOFF)
        await wait_for(events, "w", ChildState.BACKOFF)
        await wait_for(events, "w", ChildState.RUNNING)
    assert attempts == 3
    assert sup.snapshot().children[0].restarts_in_window == 2
    await sup.stop()


# -- callers that go away, workers that call back, slow starters --------------------


async def test_a_cancelled_caller_does_not_leave_a_child_half_stopped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = Probe(stop_delay=3.0)
    sup = Supervisor("sup", [spec("w", probe)])
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        with trio.move_on_after(1):
            await sup.terminate_child("w")
        # The caller gave up; the stop goes on and completes.
        await wait_for(events, "w", ChildState.STOPPED)
    await sup.restart_child("w")
    assert sup.which_children()[0].state is ChildState.RUNNING
    await sup.stop()


async def test_a_cancelled_caller_does_not_leave_a_child_half_started(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def slow(ctx: ChildContext) -> None:
        await trio.sleep(5)
        ctx.started()
        await ctx.wait_stop_requested()

    sup = Supervisor("sup")
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        with trio.move_on_after(1):
            await sup.start_child(ChildSpec("slow", slow))
        await wait_for(events, "slow", ChildState.RUNNING)
    assert sup.count_children().active == 1
    await sup.stop()


async def test_a_call_in_flight_when_the_supervisor_is_cancelled_gets_a_clear_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor("sup", [spec("w", Probe(stop_delay=3.0))])
    errors: list[BaseException] = []

    async def restart() -> None:
        try:
            await sup.restart_child("w")
        except SupervisorNotRunning as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers, trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        callers.start_soon(restart)
        await trio.sleep(1)  # the restart is waiting for the worker to stop
        nursery.cancel_scope.cancel()
    assert [str(e) for e in errors] == ["supervisor 'sup' was cancelled"]
    assert [c.state for c in sup.which_children()] == [ChildState.STOPPED]


async def test_a_worker_cannot_terminate_itself_through_its_supervisor(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    refused: list[str] = []

    async def selfish(ctx: ChildContext) -> None:
        ctx.started()
        try:
            await sup.terminate_child(ctx.id)
        except ChildRunningError as exc:
            refused.append(str(exc))
        await ctx.wait_stop_requested()

    sup = Supervisor("sup", [ChildSpec("w", selfish, shutdown=INFINITY)])
    await nursery.start(sup.run)
    await trio.testing.wait_all_tasks_blocked()
    assert refused == [
        "supervisor 'sup': child 'w' cannot stop or restart itself through its "
        "supervisor; return from the worker instead"
    ]
    await sup.stop()


async def test_a_worker_may_manage_its_siblings_once_ready(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    helper = Probe()

    async def manager(ctx: ChildContext) -> None:
        ctx.started()
        await sup.start_child(spec("helper", helper))
        await ctx.wait_stop_requested()

    sup = Supervisor("sup", [ChildSpec("manager", manager)])
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        await wait_for(events, "helper", ChildState.RUNNING)
    assert [c.id for c in sup.which_children()] == ["manager", "helper"]
    assert sup.snapshot().children[0].restarts_in_window == 0
    await sup.stop()


async def test_a_transient_sub_supervisor_that_gives_up_stays_down(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    worker = Probe()
    sub = Supervisor("sub", [spec("w", worker)], intensity=Intensity(max_restarts=0, period=5.0))
    root = Supervisor("root", [ChildSpec("sub", sub, restart=RestartType.TRANSIENT)])
    with root.events.subscribe() as events:
        await nursery.start(root.run)
        worker.order("crash")
        await wait_for(events, "sub", ChildState.STOPPED)
    # OTP: a supervisor past its intensity exits with reason shutdown.
    node = root.snapshot().children[0]
    assert node.last_exit is not None
    assert node.last_exit.kind is ExitKind.SHUTDOWN
    assert "RestartIntensityExceeded" in node.last_exit.detail
    assert worker.starts == 1
    await root.stop()


async def test_wait_stopped_returns_when_the_run_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor("sup", [spec("w", Probe())])
    await sup.wait_stopped()  # never ran: nothing to wait for
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.start_soon(sup.stop)
        await sup.wait_stopped()
        assert sup.phase is SupervisorPhase.STOPPED


async def test_slow_starters_do_not_hold_up_the_supervisor(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    loaded = trio.Event()

    async def model(ctx: ChildContext) -> None:
        await loaded.wait()  # minutes of model loading, in real life
        ctx.started(pid=77)
        await ctx.wait_stop_requested()

    sup = Supervisor("instances")
    await nursery.start(sup.run)
    with sup.events.subscribe() as events:
        info = await sup.start_child(ChildSpec("big", model, await_ready=False))
        assert info.state is ChildState.STARTING
        # The supervisor is free meanwhile: another child starts and stops.
        await sup.start_child(spec("small", Probe()))
        await sup.terminate_child("small")
        loaded.set()
        await wait_for(events, "big", ChildState.RUNNING)
    assert sup.which_children()[0].pid == 77
    await sup.stop()


async def test_a_slow_starter_that_dies_before_ready_follows_its_restart_policy(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    attempts = 0

    async def bad_model(ctx: ChildContext) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("model not found")

    child = ChildSpec(
        "bad",
        bad_model,
        await_ready=False,
        backoff=Backoff(initial=1.0),
        intensity=Intensity(max_restarts=2, period=60.0),
    )
    sup = Supervisor("instances", intensity=None)
    await nursery.start(sup.run)
    with sup.events.subscribe() as events:
        await sup.start_child(child)
        event = await wait_for(events, "bad", ChildState.FAILED)
    assert attempts == 3
    assert "model not found" in event.reason
    await sup.stop()


async def test_health_reports_move_a_child_between_running_and_unhealthy(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    verdicts: trio.MemorySendChannel[bool]
    verdicts, receive = trio.open_memory_channel[bool](0)

    async def probed(ctx: ChildContext) -> None:
        ctx.report_health(False, "ignored before ready")
        ctx.started()
        async for healthy in receive:
            ctx.report_health(healthy, "probe")
        raise RuntimeError("probes say it is dead")

    sup = Supervisor("sup", [ChildSpec("m", probed, backoff=FAST)])
    with sup.events.subscribe() as events:
        await nursery.start(sup.run)
        await verdicts.send(False)
        await wait_for(events, "m", ChildState.UNHEALTHY)
        await verdicts.send(False)  # already unhealthy: no event
        await verdicts.send(True)
        await wait_for(events, "m", ChildState.RUNNING)
        await verdicts.send(False)
        await wait_for(events, "m", ChildState.UNHEALTHY)
        await verdicts.aclose()
        event = await wait_for_exit(events, "m")
    assert (event.old, event.new) == (ChildState.UNHEALTHY, ChildState.BACKOFF)
    await sup.stop()
