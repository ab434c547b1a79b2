"""How a request's end is reported: the status code each way of ending gets."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from teisup.grpc.observe import RequestRecord, current_request, observed
from teisup.rpc import StatusCode, status_error


class Records:
    def __init__(self) -> None:
        self.done: list[RequestRecord] = []

    def request_done(self, record: RequestRecord) -> None:
        self.done.append(record)


async def _in_nursery() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        await trio.sleep_forever()


@pytest.mark.parametrize("with_nursery", [False, True], ids=["plain", "nursery"])
async def test_a_deadline_and_a_cancel_are_told_apart(
    with_nursery: bool, autojump_clock: trio.testing.MockClock
) -> None:
    records = Records()
    wait = _in_nursery if with_nursery else trio.sleep_forever
    with trio.move_on_after(5):  # the client's deadline
        with observed(records, "grpc", "Embed"):
            await wait()
    with trio.CancelScope() as scope:  # the client reset the stream
        async with trio.open_nursery() as outer:
            outer.start_soon(_cancel_after, scope, 1.0)
            with observed(records, "grpc", "Embed"):
                await wait()
    assert [r.code for r in records.done] == ["DEADLINE_EXCEEDED", "CANCELLED"]


async def _cancel_after(scope: trio.CancelScope, seconds: float) -> None:
    await trio.sleep(seconds)
    scope.cancel()


async def _failing_nursery(records: Records) -> None:
    with observed(records, "grpc", "EmbedArrow"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise status_error(StatusCode.NOT_FOUND, "no such instance")


async def test_statuses_routing_and_rows_are_recorded() -> None:
    records = Records()
    with observed(records, "http", "embed") as record:
        current = current_request()
        assert current is record
        current.instance, current.rows = "minilm", 3
    with pytest.raises(BaseExceptionGroup):
        await _failing_nursery(records)
    with pytest.raises(ValueError, match="bug"), observed(records, "grpc", "Info"):
        raise ValueError("bug")
    assert [(r.method, r.instance, r.code, r.rows) for r in records.done] == [
        ("embed", "minilm", "OK", 3),
        ("EmbedArrow", "", "NOT_FOUND", None),
        ("Info", "", "UNKNOWN", None),
    ]
    assert current_request() is None
