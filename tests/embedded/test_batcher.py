"""How the batcher forms batches, on a fake engine: no model, no torch.

The policy (`BatchLimits`, `Gathering`) is tested as plain objects; the
batcher itself mostly in virtual time (``autojump_clock``), where "no added
delay" is exact: the clock does not move.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from teisup.embedded.batcher import Batcher, BatchLimits, Gathering, OpenStream
from teisup.embedded.engine import Encoded, Outputs
from teisup.embedded.metrics import Metrics


class FakeEngine:
    """Records the size of every batch it is given; a pass takes ``pass_s`` (real time)."""

    def __init__(self, pass_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.pass_s = pass_s

    def forward(self, batch: Sequence[Encoded], *, want_tokens: bool = False) -> Outputs:
        self.batches.append(len(batch))
        if self.pass_s:
            time.sleep(self.pass_s)  # the model computing, on the inference thread
        return Outputs(pooled=np.arange(len(batch), dtype=np.float32).reshape(-1, 1))


def batcher_for(engine: FakeEngine, **options: Any) -> Batcher:
    defaults: dict[str, Any] = {
        "max_batch_tokens": 16384,
        "max_batch_requests": None,
        "max_concurrent_requests": 512,
        "metrics": Metrics(),
    }
    return Batcher(engine, **{**defaults, **options})  # type: ignore[arg-type]


def encoded(n: int = 3) -> Encoded:
    return Encoded(list(range(n)), [0] * n, n)


async def test_a_burst_arriving_over_several_rounds_forms_one_batch() -> None:
    engine = FakeEngine()
    batcher = batcher_for(engine, gather_quiet_s=60.0)
    rows: dict[int, int] = {}

    async def arrive(index: int) -> None:
        # As messages being parsed: each reaches the queue a few rounds later.
        for _ in range(index):
            await trio.lowlevel.checkpoint()
        rows[index] = (await batcher.submit(encoded())).row

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as burst:
                for index in range(12):
                    burst.start_soon(arrive, index)
        nursery.cancel_scope.cancel()
    assert engine.batches == [12]
    assert sorted(rows) == list(range(12))  # every row is handed back, in arrival order
    assert [rows[i] for i in range(12)] == list(range(12))


async def test_what_does_not_fit_forms_the_next_batch() -> None:
    engine = FakeEngine()
    batcher = batcher_for(engine, max_batch_requests=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as burst:
            for _ in range(10):
                burst.start_soon(batcher.submit, encoded())
        nursery.cancel_scope.cancel()
    assert engine.batches == [4, 4, 2]


async def test_a_lone_request_or_a_turn_by_turn_stream_does_not_wait() -> None:
    engine = FakeEngine()
    # Were anything to wait for more arrivals, it would wait an hour.
    batcher = batcher_for(engine, gather_quiet_s=3600.0, gather_max_s=3600.0)
    turn_by_turn = OpenStream()
    turn_by_turn.on_request()
    turn_by_turn.on_answer()
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with trio.fail_after(10):
            await batcher.submit(encoded())
            with batcher.stream_open(turn_by_turn):
                turn_by_turn.on_request()  # its second request, the first answered
                assert not turn_by_turn.expects_more
                await batcher.submit(encoded())
        nursery.cancel_scope.cancel()
    assert engine.batches == [1, 1]


async def test_an_open_stream_gets_a_moment_for_its_next_message() -> None:
    engine = FakeEngine()
    batcher = batcher_for(engine, gather_quiet_s=5.0, gather_max_s=10.0)
    stream = OpenStream()
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with trio.fail_after(5):
            async with trio.open_nursery() as client:
                with batcher.stream_open(stream):
                    stream.on_request()
                    assert stream.expects_more  # a stream that has just started
                    client.start_soon(batcher.submit, encoded())
                    await trio.sleep(0.05)  # the client's next message comes a bit later
                    stream.on_request()
                    assert stream.expects_more  # two awaiting answers: pipelined
                    client.start_soon(batcher.submit, encoded())
                    await trio.sleep(0.05)
                    stream.on_request()
                    client.start_soon(batcher.submit, encoded())
                # The stream half-closes: the batcher stops waiting at once.
        nursery.cancel_scope.cancel()
    assert engine.batches == [3]


async def test_a_stream_closing_while_idle_runs_no_batch() -> None:
    engine = FakeEngine()
    batcher = batcher_for(engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with batcher.stream_open(OpenStream()):
            await trio.sleep(0.01)
        await trio.sleep(0.01)
        await batcher.submit(encoded())
        nursery.cancel_scope.cancel()
    assert engine.batches == [1]


# -- what goes in the next batch: BatchLimits, pure ---------------------------------


def test_a_batch_takes_entries_in_order_while_the_padded_size_fits() -> None:
    limits = BatchLimits(max_batch_tokens=40)
    # Padded: longest times count. 10*1, 10*2, 10*3, then 20*4 = 80 > 40.
    assert limits.take([10, 10, 10, 20, 1]) == 3
    assert limits.take([10, 10, 10, 10]) == 4
    assert limits.take([30, 20]) == 1  # 30*2 = 60
    assert limits.take([]) == 0


def test_the_first_entry_is_always_taken_and_the_request_cap_holds() -> None:
    assert BatchLimits(max_batch_tokens=8).take([50, 1]) == 1
    capped = BatchLimits(max_batch_tokens=1000, max_batch_requests=2)
    assert capped.take([1, 1, 1]) == 2
    assert capped.full([1, 1])
    assert not capped.full([1])
    assert BatchLimits(max_batch_tokens=20).full([10, 10, 10])
    assert not BatchLimits(max_batch_tokens=20).full([10, 10])


# -- when to cut it: Gathering, pure --------------------------------------------------


def gathering() -> Gathering:
    return Gathering(quiet_s=0.002, max_s=0.05, return_s=0.1)


def test_nobody_expected_means_no_wait() -> None:
    policy = gathering()
    policy.arrived(0.0)
    assert policy.wait_until(0.0, since=0.0, full=False, streams_expect_more=False) is None


def test_answered_callers_are_waited_for_until_they_are_back() -> None:
    policy = gathering()
    policy.answered(3, now=1.0)
    policy.arrived(1.001)
    # Two still out: wait for the next arrival, quiet_s after the last one.
    assert policy.wait_until(1.001, since=1.001, full=False, streams_expect_more=False) == 1.003
    policy.arrived(1.002)
    assert policy.wait_until(1.002, since=1.001, full=False, streams_expect_more=False) == 1.004
    policy.arrived(1.0025)
    assert policy.expected(1.0025) == 0
    assert policy.wait_until(1.0025, since=1.001, full=False, streams_expect_more=False) is None


def test_callers_just_answered_get_a_quiet_wait_though_nobody_arrived_lately() -> None:
    # A straggler arrived during the last pass; the pass's callers were just
    # answered: the straggler waits for them rather than running alone.
    policy = gathering()
    policy.arrived(0.5)
    policy.answered(3, now=1.0)
    assert policy.wait_until(1.0, since=1.0, full=False, streams_expect_more=False) == 1.002
    # None of them back within quiet_s: cut, and stop expecting them.
    assert policy.wait_until(1.002, since=1.0, full=False, streams_expect_more=False) is None
    assert policy.expected(1.002) == 0


def test_a_full_batch_or_an_expired_answer_does_not_wait() -> None:
    policy = gathering()
    policy.answered(2, now=0.0)
    assert policy.wait_until(0.0, since=0.0, full=True, streams_expect_more=True) is None
    assert policy.expected(0.05) == 2
    assert policy.expected(0.2) == 0  # not back within return_s: gone
    assert policy.wait_until(0.2, since=0.2, full=False, streams_expect_more=False) is None


def test_gathering_is_capped_by_max_s_and_by_a_quarter_of_the_last_pass() -> None:
    policy = gathering()
    policy.answered(10, now=0.0)
    policy.arrived(0.0)
    assert policy.wait_until(0.0, since=0.0, full=False, streams_expect_more=True) == 0.002
    policy.arrived(0.0499)
    assert policy.wait_until(0.0499, since=0.0, full=False, streams_expect_more=True) == 0.05
    assert policy.wait_until(0.05, since=0.0, full=False, streams_expect_more=True) is None
    policy.pass_took(0.004)  # a fast model: waiting is worth at most 1 ms
    policy.arrived(1.0)
    assert policy.wait_until(1.0, since=1.0, full=False, streams_expect_more=True) == 1.001


# -- the batcher in virtual time ------------------------------------------------------


async def test_looping_callers_come_back_into_one_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Eight clients each call, get their answer, and call again a little
    # later, one after the other: each round is one batch of eight.
    engine = FakeEngine(pass_s=0.01)
    batcher = batcher_for(engine)

    async def client(index: int) -> None:
        for _ in range(5):
            await batcher.submit(encoded())
            await trio.sleep(0.0002 * (index + 1))  # back at staggered times

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as clients:
            for index in range(8):
                clients.start_soon(client, index)
        nursery.cancel_scope.cancel()
    assert engine.batches == [8] * 5
    stats = batcher.statistics()
    assert (stats.passes, stats.entries, stats.queued, stats.admitted) == (5, 40, 0, 0)


async def test_a_lone_caller_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine()
    # Were it to wait for anyone, it would wait an hour of virtual time.
    batcher = batcher_for(engine, gather_quiet_s=3600.0, gather_max_s=3600.0, return_s=7200.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for _ in range(3):
            before = trio.current_time()
            await batcher.submit(encoded())
            assert trio.current_time() == before  # no added delay at all
            await trio.sleep(1.0)  # thinking
        nursery.cancel_scope.cancel()
    assert engine.batches == [1, 1, 1]


async def test_a_caller_that_does_not_come_back_costs_one_quiet_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(pass_s=0.01)  # a quarter of a pass is more than quiet_s
    batcher = batcher_for(engine, gather_quiet_s=0.002)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as pair:
            pair.start_soon(batcher.submit, encoded())
            pair.start_soon(batcher.submit, encoded())
        # Only one of the two comes back: it waits quiet_s for the other, once.
        before = trio.current_time()
        await batcher.submit(encoded())
        assert trio.current_time() - before == pytest.approx(0.002)
        before = trio.current_time()
        await batcher.submit(encoded())
        assert trio.current_time() == before
        nursery.cancel_scope.cancel()
    assert engine.batches == [2, 1, 1]


async def test_a_full_batch_does_not_wait_for_callers_coming_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    batcher = batcher_for(engine, max_batch_requests=4, gather_quiet_s=3600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as burst:
            for _ in range(8):
                burst.start_soon(batcher.submit, encoded())
        before = trio.current_time()
        async with trio.open_nursery() as burst:
            for _ in range(4):
                burst.start_soon(batcher.submit, encoded())
        assert trio.current_time() == before  # four of eight back: a full batch, at once
        nursery.cancel_scope.cancel()
    assert engine.batches == [4, 4, 4]


async def test_admission_refuses_at_once_when_full_and_frees_on_release() -> None:
    batcher = batcher_for(FakeEngine(), max_concurrent_requests=2)
    assert batcher.try_admit()
    assert batcher.try_admit()
    assert not batcher.try_admit()  # full: refused without waiting
    assert batcher.statistics().admitted == 2
    async with trio.open_nursery() as nursery:
        admitted = trio.Event()

        async def waiter() -> None:
            await batcher.admit()
            admitted.set()

        nursery.start_soon(waiter)
        await wait_all_tasks_blocked()
        assert not admitted.is_set()  # admit() waits for a place
        batcher.release()
        await admitted.wait()
    assert not batcher.try_admit()
    batcher.release()
    batcher.release()
    assert batcher.statistics().admitted == 0
