"""The transition hook: every state change of every child, as an event.

A tree shares one `TransitionBus`, owned by its root supervisor. Subscribers
(the state writer, metrics, logs, tests) each get their own unbounded queue, so
publishing never blocks the supervisor and a slow subscriber loses nothing: it
only falls behind, which `TransitionBus.statistics` shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import msgspec
import trio

from .lifecycle import ChildState

__all__ = ["BusStatistics", "TransitionBus", "TransitionEvent"]


class TransitionEvent(msgspec.Struct, frozen=True):
    """One child moved from ``old`` to ``new``.

    ``path`` names the child from the root supervisor down, e.g.
    ``("root", "instances", "bge-small")``. ``time`` is monotonic seconds
    (``trio.current_time()``), never wall-clock time.
    """

    path: tuple[str, ...]
    old: ChildState
    new: ChildState
    reason: str
    time: float

    @property
    def child_id(self) -> str:
        return self.path[-1]


class BusStatistics(msgspec.Struct, frozen=True):
    """How the bus is doing: subscribers, events published, the worst backlog."""

    subscribers: int
    published: int
    max_backlog: int


class TransitionBus:
    """Fan-out of `TransitionEvent` to any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[trio.MemorySendChannel[TransitionEvent]] = []
        self._published = 0

    def publish(self, event: TransitionEvent) -> None:
        """Deliver ``event`` to every subscriber without blocking."""
        self._published += 1
        for send in self._subscribers:
            # Unbounded buffers: send_nowait cannot raise WouldBlock. A subscriber
            # that closed its end early is simply skipped.
            with suppress(trio.BrokenResourceError):
                send.send_nowait(event)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[TransitionEvent]]:
        """Receive every event published while the ``with`` block is open.

        ::

            with bus.subscribe() as events:
                async for event in events:
                    ...
        """
        send, receive = trio.open_memory_channel[TransitionEvent](math.inf)
        self._subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.remove(send)
            send.close()

    def statistics(self) -> BusStatistics:
        backlog = max((s.statistics().current_buffer_used for s in self._subscribers), default=0)
        return BusStatistics(
            subscribers=len(self._subscribers), published=self._published, max_backlog=backlog
        )
