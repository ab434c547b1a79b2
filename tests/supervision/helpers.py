"""Test workers the tests drive by hand, and waiting on transition events."""

from __future__ import annotations

import math
from collections.abc import Iterable

import trio

from teisup.supervision import ChildContext, ChildState, ExitReason, TransitionEvent


class Probe:
    """A worker whose every run reports ready, then does what the test orders.

    Orders: ``"crash"`` (raise), ``"normal"`` (return), ``"shutdown"`` (return a
    shutdown reason). A stop request ends the run, unless ``obey_stop`` is False
    (then only cancellation does) or ``stop_delay`` makes it linger first.
    """

    def __init__(
        self,
        *,
        obey_stop: bool = True,
        stop_delay: float = 0.0,
        fail_start: bool = False,
        pid: int | None = None,
    ) -> None:
        self.obey_stop = obey_stop
        self.stop_delay = stop_delay
        self.fail_start = fail_start
        self.pid = pid
        self.starts = 0
        self.saw_stop_request = 0
        self.cancelled = 0
        self._send, self._orders = trio.open_memory_channel[str](math.inf)

    def order(self, what: str) -> None:
        self._send.send_nowait(what)

    async def __call__(self, ctx: ChildContext) -> ExitReason | None:
        self.starts += 1
        if self.fail_start:
            raise RuntimeError("cannot start")
        ctx.started(pid=self.pid)
        order = None
        try:
            order = await self._next_order(ctx)
        finally:
            # Cancellation may arrive wrapped in an exception group from the
            # inner nursery, so count it by what did not happen.
            if order is None:
                self.cancelled += 1
        if order == "crash":
            raise RuntimeError("boom")
        if order == "shutdown":
            return ExitReason.shutdown("done")
        return None

    async def _next_order(self, ctx: ChildContext) -> str:
        result = "stop"
        async with trio.open_nursery() as nursery:

            async def take_order() -> None:
                nonlocal result
                result = await self._orders.receive()
                nursery.cancel_scope.cancel()

            async def watch_stop() -> None:
                await ctx.wait_stop_requested()
                self.saw_stop_request += 1
                if not self.obey_stop:
                    await trio.sleep_forever()
                await trio.sleep(self.stop_delay)
                nursery.cancel_scope.cancel()

            nursery.start_soon(take_order)
            nursery.start_soon(watch_stop)
        return result


async def wait_for(
    events: trio.MemoryReceiveChannel[TransitionEvent],
    child_id: str,
    state: ChildState,
    seen: list[TransitionEvent] | None = None,
) -> TransitionEvent:
    """Consume events until ``child_id`` enters ``state``; return that event.

    Every event consumed on the way, that one included, is appended to ``seen``.
    """
    async for event in events:
        if seen is not None:
            seen.append(event)
        if event.child_id == child_id and event.new is state:
            return event
    raise AssertionError("event stream closed")


async def wait_for_exit(
    events: trio.MemoryReceiveChannel[TransitionEvent], child_id: str
) -> TransitionEvent:
    """Consume events until ``child_id`` exits by itself; return that event."""
    async for event in events:
        if event.child_id == child_id and event.new in _AFTER_EXIT and event.old in _BEFORE_EXIT:
            return event
    raise AssertionError("event stream closed")


_BEFORE_EXIT = {ChildState.STARTING, ChildState.RUNNING, ChildState.UNHEALTHY}
_AFTER_EXIT = {ChildState.BACKOFF, ChildState.STOPPED, ChildState.FAILED}


def drain(events: trio.MemoryReceiveChannel[TransitionEvent]) -> list[TransitionEvent]:
    """Every event already delivered, without waiting."""
    out = []
    while True:
        try:
            out.append(events.receive_nowait())
        except trio.WouldBlock:
            return out


def moves(events: Iterable[TransitionEvent]) -> list[tuple[str, str]]:
    """Events as ``(child id, new state)`` pairs, for comparing sequences."""
    return [(e.child_id, e.new.value) for e in events]
