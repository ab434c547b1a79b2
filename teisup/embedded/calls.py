"""The shapes of a ``tei.v1`` call, and the one place a failed request is counted.

`CallShapes` turns an RPC implementation into a `teisup.rpc.Handler`:

* `unary`: one request, one answer;
* `ordered_stream`: a bidi stream whose requests are all computed at once
  (at most ``GRPC_MAX_PARALLEL_STREAM_REQUESTS`` outstanding) and answered in
  request order; the first error ends the stream;
* `collected`: a client stream read to its end, then one answer.

Each stream call has a `PermitShare` (`current_share` in its tasks): the
concurrency permits its inputs hold, so an input may wait for the call's own
permits to come back but never queues behind another call's.

An implementation raises `TeiError` for a refused or failed request; the
shape counts it in ``te_request_failure`` under its kind's label (`failed`,
the only place that does) and answers with the kind's status.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from teisup.rpc import Handler, RpcStatusError, ServerCall, status_error

from .batcher import Batcher, OpenStream
from .metrics import Metrics
from .validation import TeiError

__all__ = ["CallShapes", "PermitShare", "current_share"]

One = Callable[[Any, bool], Awaitable[Any]]
"""An RPC implementation: ``(request, unary) -> response``."""


class PermitShare:
    """The concurrency permits one call's inputs hold right now."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


_SHARE: contextvars.ContextVar[PermitShare | None] = contextvars.ContextVar(
    "teisup_embedded_permit_share", default=None
)


def current_share() -> PermitShare | None:
    """The running stream call's `PermitShare` (None outside a stream)."""
    return _SHARE.get()


@dataclass(slots=True)
class _Ready:
    """One stream answer to come: set once its computation ends, in any order."""

    done: trio.Event
    response: Any = None
    error: BaseException | None = None


class CallShapes:
    """Handlers of each call shape over one batcher, counting failures in ``metrics``."""

    def __init__(self, batcher: Batcher, metrics: Metrics, *, max_parallel_stream: int) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.max_parallel_stream = max_parallel_stream

    def failed(self, error: TeiError) -> RpcStatusError:
        """Count ``error`` (if TEI counts its kind) and return the status it answers with."""
        label = error.kind.metric
        if error.counted and label is not None:
            self.metrics.inc("te_request_failure", err=label)
        return status_error(error.kind.code, error.message)

    def unary(self, one: One) -> Handler:
        """One request, ``one(request, True)``, one answer."""

        async def handle(call: ServerCall) -> None:
            request = await call.receive_one()
            try:
                response = await one(request, True)
            except TeiError as exc:
                raise self.failed(exc) from None
            await call.send(response)

        return handle

    def collected(self, every: Callable[[list[Any]], Awaitable[Any]]) -> Handler:
        """Every request of a client stream, then ``every(requests)``'s one answer."""

        async def handle(call: ServerCall) -> None:
            requests = []
            while (request := await call.receive()) is not None:
                requests.append(request)
            try:
                response = await every(requests)
            except TeiError as exc:
                raise self.failed(exc) from None
            await call.send(response)

        return handle

    def ordered_stream(self, one: One) -> Handler:
        """A bidi handler: every request computed concurrently, answered in order."""

        async def handle(call: ServerCall) -> None:
            # The tasks started below copy this context: they share the call's permits.
            token = _SHARE.set(PermitShare())
            try:
                await stream(call)
            finally:
                _SHARE.reset(token)

        async def stream(call: ServerCall) -> None:
            pending_send, pending_receive = trio.open_memory_channel[_Ready](
                self.max_parallel_stream
            )
            failure: BaseException | None = None
            opened = OpenStream()

            async def compute(request: Any, slot: _Ready) -> None:
                try:
                    slot.response = await one(request, False)
                except TeiError as exc:
                    slot.error = self.failed(exc)
                finally:
                    slot.done.set()

            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    # While the client may send more, an idle batcher waits a
                    # moment for them to join the batch (Batcher.gather).
                    with self.batcher.stream_open(opened):
                        async with pending_send:
                            while (request := await call.receive()) is not None:
                                opened.on_request()
                                slot = _Ready(trio.Event())
                                try:
                                    pending_send.send_nowait(slot)
                                except trio.WouldBlock:
                                    # Waits when max_parallel answers are outstanding.
                                    await pending_send.send(slot)
                                nursery.start_soon(compute, request, slot)

                nursery.start_soon(read)
                async with pending_receive:
                    while True:
                        # Answers that are ready go out back to back, with no
                        # checkpoint in between, so purerpc's writer sends
                        # them in one write instead of one write each.
                        try:
                            slot = pending_receive.receive_nowait()
                        except trio.WouldBlock:
                            try:
                                slot = await pending_receive.receive()
                            except trio.EndOfChannel:
                                break
                        except trio.EndOfChannel:
                            break
                        if not slot.done.is_set():
                            await slot.done.wait()
                        if slot.error is not None:
                            # The first error ends the stream: drop the rest.
                            failure = slot.error
                            nursery.cancel_scope.cancel()
                            break
                        await call.send(slot.response)
                        opened.on_answer()
            if failure is not None:
                # Raised out here, not in the nursery, so it is not wrapped in a group.
                raise failure

        return handle
