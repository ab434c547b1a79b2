"""The state writer: snapshots written after changes, retried on a timer until they land.

A change is *applied* at once (the manager holds it) and *durable* once a
snapshot holding it is on disk. The writer keeps the two apart and says which
is which: a lifecycle call waits a bounded time for durability (`persist`),
then answers anyway with ``False``; `status` tells /health and the metrics
whether anything is unsaved, since when, and why. A failed write is retried on
the writer's own timer (`RetrySchedule`, capped), so a disk that comes back
gets the snapshot without any further request.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..supervision import ChildContext
from .state import SavedInstance, Snapshot, StateStore

__all__ = ["RetrySchedule", "StateStatus", "StateWriter"]

logger = logging.getLogger("teisup.state")

#: Runs a blocking call off the event loop (the seam virtual-time tests replace).
Offload = Callable[..., Awaitable[Any]]


class RetrySchedule:
    """When to try a failed write again: ``initial * factor**n``, capped at ``maximum``.

    Pure: the caller passes the time. `failed` starts or extends the streak
    and returns when to retry; `succeeded` ends it.
    """

    def __init__(self, initial: float = 0.25, factor: float = 2.0, maximum: float = 5.0) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.factor = factor
        self.maximum = maximum
        #: Failed attempts in a row.
        self.streak = 0
        #: When the next retry is due, or None when nothing failed.
        self.retry_at: float | None = None

    def delay(self) -> float:
        """The wait before the next retry, after `streak` failures."""
        exponent = max(self.streak - 1, 0)
        # Compared in the exponent, so a long outage never overflows a float.
        if self.factor > 1 and exponent * math.log(self.factor) >= math.log(
            self.maximum / self.initial
        ):
            return self.maximum
        return min(self.initial * self.factor**exponent, self.maximum)

    def failed(self, now: float) -> float:
        """Record a failed attempt at ``now``; return when to retry."""
        self.streak += 1
        self.retry_at = now + self.delay()
        return self.retry_at

    def succeeded(self) -> None:
        """A write landed: the streak is over."""
        self.streak = 0
        self.retry_at = None


class StateStatus(msgspec.Struct, frozen=True):
    """Whether every applied change is on disk (/health's ``state``)."""

    #: True when the file holds every change the manager has applied.
    durable: bool
    #: When the oldest unsaved change was applied (RFC 3339), or None.
    pending_since: str | None = None
    #: Seconds the oldest unsaved change has waited.
    pending_seconds: float = 0.0
    #: Why the last write failed, while it is not yet retried successfully.
    last_error: str | None = None
    #: Failed writes in a row.
    failures_in_a_row: int = 0
    #: Seconds until the next retry, while one is scheduled.
    next_retry_in: float | None = None
    #: The state file.
    path: str = ""


def _rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


class StateWriter:
    """Writes a snapshot after changes; a lifecycle call waits a bounded time for it.

    `mark_dirty` asks for a write without waiting (transitions); `persist`
    asks, has it attempted at once, and waits at most ``durable_wait`` seconds
    for it to land. Changes that arrive while a write is in progress share the
    next write. A failed write is logged, counted, and retried on the
    writer's own `RetrySchedule` until it lands.
    """

    def __init__(
        self,
        store: StateStore,
        collect: Callable[[], list[SavedInstance]],
        *,
        on_write: Callable[[float, bool], None] | None = None,
        durable_wait: float = 1.0,
        retry: RetrySchedule | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
        offload: Offload = trio.to_thread.run_sync,
    ) -> None:
        self.store = store
        self.collect = collect
        self.on_write = on_write
        self.durable_wait = durable_wait
        self.retry = retry or RetrySchedule()
        self._clock = clock
        self._wall_clock = wall_clock
        self._offload = offload
        self._requested = 0
        self._attempted = 0
        self._written = 0
        self._changed = trio.Event()
        self._urgent = trio.Event()
        self._progress = trio.Event()
        self.failures = 0
        self.last_error: str | None = None
        self._last_written: list[SavedInstance] | None = None
        #: (clock, wall clock) of the oldest change not yet written.
        self._pending_since: tuple[float, float] | None = None

    # -- asking ------------------------------------------------------------------

    def mark_dirty(self) -> int:
        """Request a write of the current state; return its generation."""
        if self._pending_since is None:
            self._pending_since = (self._clock(), self._wall_clock())
        self._requested += 1
        self._changed.set()
        return self._requested

    async def persist(self) -> bool:
        """Request a write now and wait for it, at most ``durable_wait`` seconds.

        True once the change is durable; False when the write failed or is
        still under way (it goes on, and is retried, without the caller).
        """
        generation = self.mark_dirty()
        self._urgent.set()
        with trio.move_on_after(self.durable_wait):
            while self._written < generation and self._attempted < generation:
                await self._progress.wait()
        return self._written >= generation

    async def wait_durable(self) -> None:
        """Return once every change requested so far is on disk."""
        generation = self._requested
        while self._written < generation:
            await self._progress.wait()

    async def write_now(self) -> bool:
        """Write at once from the calling task (the final snapshot at shutdown)."""
        generation = self.mark_dirty()
        await self._write(generation)
        return self._written >= generation

    # -- telling -----------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """Whether the file holds every change requested so far."""
        return self._written >= self._requested

    def status(self) -> StateStatus:
        """What /health and the metrics say about the state file."""
        path = str(self.store.path)
        since = self._pending_since
        if self.durable or since is None:
            return StateStatus(durable=True, path=path)
        now = self._clock()
        retry_at = self.retry.retry_at
        return StateStatus(
            durable=False,
            pending_since=_rfc3339(since[1]),
            pending_seconds=round(max(now - since[0], 0.0), 3),
            last_error=self.last_error,
            failures_in_a_row=self.retry.streak,
            next_retry_in=None if retry_at is None else round(max(retry_at - now, 0.0), 3),
            path=path,
        )

    # -- writing -----------------------------------------------------------------

    async def run(self, ctx: ChildContext) -> None:
        """The worker: write whenever asked, retry until written, until asked to stop."""
        ctx.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.loop)
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()
        if not await self.write_now():
            logger.error(
                "state: the final snapshot could not be written; %s does not hold the "
                "changes since %s",
                self.store.path,
                self.status().pending_since,
            )

    async def loop(self) -> None:
        """Write whenever a change is pending; after a failure, when the retry is due.

        A `persist` call does not wait for the retry timer: it has the write
        attempted at once (the disk may be back; an attempt on a full or
        read-only disk fails fast). A transition does wait for it.
        """
        while True:
            if self._attempted >= self._requested and self.durable:
                self._changed = trio.Event()
                await self._changed.wait()
            retry_at = self.retry.retry_at
            if retry_at is not None and not self._urgent.is_set():
                with trio.move_on_at(retry_at):
                    await self._urgent.wait()
            self._urgent = trio.Event()
            if await self._write(self._requested):
                self.retry.succeeded()
            else:
                retry_at = self.retry.failed(self._clock())
                logger.warning(
                    "state: retrying the write of %s in %.2fs",
                    self.store.path,
                    retry_at - self._clock(),
                )

    async def _write(self, generation: int) -> bool:
        instances = self.collect()
        if instances == self._last_written:
            # Most transitions (running <-> unhealthy, ...) change nothing a
            # snapshot holds: no I/O, and the file keeps its last_updated.
            self._settle(generation, written=True)
            return True
        snapshot = Snapshot(last_updated=_rfc3339(self._wall_clock()), instances=instances)
        began = time.perf_counter()
        ok = True
        try:
            with trio.CancelScope(shield=True):
                await self._offload(self.store.save, snapshot)
        except OSError as exc:
            ok = False
            self.failures += 1
            self.last_error = f"{exc.strerror or exc} ({self.store.path})"
            logger.error("state: cannot write %s: %s", self.store.path, exc)
        else:
            if self.last_error is not None:
                logger.warning("state: %s written again after the failures", self.store.path)
            self._last_written = instances
            self.last_error = None
        if self.on_write is not None:
            self.on_write(time.perf_counter() - began, ok)
        self._settle(generation, written=ok)
        return ok

    def _settle(self, generation: int, *, written: bool) -> None:
        if written:
            self._written = max(self._written, generation)
            if self._written >= self._requested:
                self._pending_since = None
        self._attempted = max(self._attempted, generation)
        progress, self._progress = self._progress, trio.Event()
        progress.set()
