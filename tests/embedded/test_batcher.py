"""How the batcher forms batches (`Batcher.gather`), on a fake engine: no model, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

from teisup.embedded.batcher import Batcher, OpenStream
from teisup.embedded.engine import Encoded, Outputs
from teisup.embedded.metrics import Metrics


class FakeEngine:
    """Records the size of every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def forward(self, batch: Sequence[Encoded], *, want_tokens: bool = False) -> Outputs:
        self.batches.append(len(batch))
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
