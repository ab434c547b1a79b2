"""The backend pool: one long-lived gRPC connection per instance, and calls that cannot hang.

`BackendPool.call` runs one backend call for one instance:

1. **Backpressure.** Each instance has a `trio.CapacityLimiter` of its
   ``max_concurrent_requests`` slots; a call waits at most ``queue_timeout``
   seconds for one, then fails with RESOURCE_EXHAUSTED. A stream or an Arrow
   request holds one slot for its whole life. Nothing queues without bound.
2. **Connection.** The instance's connection is reused while its
   ``(pid, port)`` is unchanged and it is alive; otherwise a new one is opened
   (within ``connect_timeout``) and the old one closed. A connection is held
   open by its own task in the pool's nursery (`teisup.rpc.open_channel` ties a
   socket's life to a block); when it dies (the backend exited, reset, spoke
   garbage), that task cancels every call running on it, which then fail with
   UNAVAILABLE at once. This is the fix for purerpc's worst trap: a client call
   on a connection whose server died waits forever.
3. **Deadline.** The call runs under ``timeout`` seconds when given
   (DEADLINE_EXCEEDED ``Request timeout`` past it, tei-manager's words), and
   the backend is told its own deadline through ``grpc-timeout`` (the
   `teisup.rpc.Channel` calls send what is left of the caller's deadline).
4. **Errors.** A backend's error status passes through unchanged (a
   `teisup.rpc.RpcStatusError` with its code and message, RESOURCE_EXHAUSTED
   for a message over the size limit); transport failures become UNAVAILABLE
   naming the instance and address.

Cancellation (the client went away, the server stops) passes through: the
backend stream is reset (RST_STREAM CANCEL) so the connection keeps no state
for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

from teisup.rpc import (
    DEFAULT_MAX_MESSAGE_LENGTH,
    Channel,
    RpcStatusError,
    RpcUnavailable,
    StatusCode,
    open_channel,
    rpc_failure,
    status_error,
)

__all__ = ["BackendPool", "InstanceView"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class InstanceView(Protocol):
    """What the pool reads from an instance (`teisup.instances.InstanceInfo` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int | None: ...


@dataclass(eq=False)
class _Connection:
    key: tuple[int | None, int]
    channel: Channel | None = None
    reason: str = ""
    died: trio.Event = field(default_factory=trio.Event)
    close_requested: trio.Event = field(default_factory=trio.Event)
    calls: set[trio.CancelScope] = field(default_factory=set)

    @property
    def usable(self) -> bool:
        """Neither dead nor on its way out (a broken transport asked it closed)."""
        return not self.died.is_set() and not self.close_requested.is_set()


@dataclass(eq=False)
class _Entry:
    limiter: trio.CapacityLimiter
    #: Set while one call opens the connection; the others wait on it.
    connecting: trio.Event | None = None
    connection: _Connection | None = None
    waiting: int = 0


class BackendPool:
    """Connections to the instances' ``tei.v1`` servers, and calls over them.

    Run it first (``await nursery.start(pool.run)``): the connections live in
    its nursery and are all closed when `run` is cancelled.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
        queue_timeout: float = 1.0,
        max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
    ) -> None:
        self.host = host
        self.max_message_length = max_message_length
        self.connect_timeout = connect_timeout
        self.queue_timeout = queue_timeout
        self._entries: dict[str, _Entry] = {}
        self._nursery: trio.Nursery | None = None
        # Set and dropped on every change of a call's state, so a waiter never
        # misses one; made only while someone waits (a cost on every call otherwise).
        self._calls_changed: trio.Event | None = None
        self.connects = 0
        """How many connections have been opened (for tests and metrics)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the pool's connections until cancelled; then close them all."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def outstanding(self, name: str) -> int:
        """Calls on ``name`` in flight or waiting for a slot."""
        entry = self._entries.get(name)
        if entry is None:
            return 0
        return int(entry.limiter.borrowed_tokens) + entry.waiting

    def in_flight(self, name: str) -> int:
        """Calls on ``name`` holding a slot right now."""
        entry = self._entries.get(name)
        return int(entry.limiter.borrowed_tokens) if entry is not None else 0

    def active_calls(self, name: str) -> int:
        """Calls on ``name`` running on its connection right now (past slot and connect)."""
        entry = self._entries.get(name)
        if entry is None or entry.connection is None:
            return 0
        return len(entry.connection.calls)

    async def wait_active(self, name: str, at_least: int = 1) -> None:
        """Return once ``name`` has ``at_least`` calls running on its connection."""
        while self.active_calls(name) < at_least:
            await self._wait_changed()

    async def wait_idle(self, name: str) -> None:
        """Return once no call runs on ``name``'s connection."""
        while self.active_calls(name) > 0:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        if self._calls_changed is None:
            self._calls_changed = trio.Event()
        await self._calls_changed.wait()

    def _changed(self) -> None:
        if self._calls_changed is not None:
            self._calls_changed.set()
            self._calls_changed = None

    def retain(self, names: Iterable[str]) -> None:
        """Close and forget the connections of instances not in ``names`` (deleted ones)."""
        keep = set(names)
        for name in [n for n in self._entries if n not in keep]:
            entry = self._entries.pop(name)
            if entry.connection is not None:
                entry.connection.close_requested.set()

    async def call(
        self,
        instance: InstanceView,
        fn: Callable[[Channel], Awaitable[T]],
        *,
        limit: int,
        timeout: float | None,  # noqa: ASYNC109 - part of the contract: ends as DEADLINE_EXCEEDED
    ) -> T:
        """Run ``fn(channel)`` against ``instance`` under the pool's rules (module docstring).

        ``limit`` is the instance's in-flight cap; ``timeout`` None means no
        deadline of the pool's own (the caller's scope, e.g. a client
        deadline or a stream's idle timeout, still applies).
        """
        entry = self._entry(instance.name, limit)
        token = object()
        entry.waiting += 1
        try:
            try:
                # A free slot is taken at once, whatever the queue timeout
                # (even 0, under which a waiting acquire would give up at once).
                entry.limiter.acquire_on_behalf_of_nowait(token)
            except trio.WouldBlock:
                with trio.move_on_after(self.queue_timeout) as waited:
                    await entry.limiter.acquire_on_behalf_of(token)
                gave_up = waited.cancelled_caught
            else:
                gave_up = False
        finally:
            entry.waiting -= 1
        if gave_up:
            raise status_error(
                StatusCode.RESOURCE_EXHAUSTED,
                f"Instance '{instance.name}' has {limit} requests in flight "
                f"(its max_concurrent_requests); none finished within {self.queue_timeout:g} s",
            )
        try:
            deadline = trio.current_time() + timeout if timeout is not None else math.inf
            connection = self._ready(entry, instance)
            if connection is None:
                with trio.CancelScope(deadline=deadline):
                    connection = await self._connection(entry, instance)
                if connection is None:  # the deadline passed while connecting
                    raise _timed_out()
            return await self._run_on(connection, instance, fn, deadline)
        finally:
            entry.limiter.release_on_behalf_of(token)

    def _entry(self, name: str, limit: int) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(trio.CapacityLimiter(limit))
        elif entry.limiter.total_tokens != limit:
            # The instance was re-created with another max_concurrent_requests.
            entry.limiter.total_tokens = limit
        return entry

    def _ready(self, entry: _Entry, instance: InstanceView) -> _Connection | None:
        """The instance's connection if it can take a call now (the common case)."""
        current = entry.connection
        if current is not None and current.key == (instance.pid, instance.port) and current.usable:
            return current
        return None

    async def _connection(self, entry: _Entry, instance: InstanceView) -> _Connection:
        while True:
            ready = self._ready(entry, instance)
            if ready is not None:
                return ready
            if entry.connecting is None:
                break
            # Another call is connecting: wait for it, all together. (A lock
            # here woke its waiters one per scheduler pass, while later calls
            # took the fast path above: in a first burst of 500 calls the
            # last waiter got its connection some 25 s after the first.)
            await entry.connecting.wait()
        current = entry.connection
        connecting = entry.connecting = trio.Event()
        try:
            if current is not None:
                # The instance restarted (new pid) or moved: the old process's
                # connection serves nobody any more.
                current.close_requested.set()
            if self._nursery is None:
                raise status_error(StatusCode.UNAVAILABLE, "the backend pool is not running")
            connection = _Connection((instance.pid, instance.port))
            try:
                with trio.fail_after(self.connect_timeout):
                    await self._nursery.start(self._hold, connection, instance.port)
            except trio.TooSlowError:
                raise self._unavailable(
                    instance, f"no connection within {self.connect_timeout:g} s"
                ) from None
            except RpcUnavailable as exc:
                raise self._unavailable(instance, exc.reason) from None
            entry.connection = connection
            self.connects += 1
            return connection
        finally:
            # Failed or not, the waiters look again (one of them may connect).
            entry.connecting = None
            connecting.set()

    async def _hold(
        self, connection: _Connection, port: int, *, task_status: trio.TaskStatus[None]
    ) -> None:
        started = False
        try:
            async with open_channel(
                self.host, port, max_message_length=self.max_message_length
            ) as channel:
                connection.channel = channel
                started = True
                task_status.started()
                await connection.close_requested.wait()
                connection.reason = "connection closed by the pool"
        except RpcUnavailable as exc:
            if not started:
                raise  # nursery.start raises it in the connecting call
            connection.reason = exc.reason
            log.debug("backend connection to port %d ended: %s", port, exc.reason)
        except Exception as exc:
            if not started:
                raise
            connection.reason = f"{type(exc).__name__}: {exc}"
            log.warning("backend connection to port %d failed", port, exc_info=True)
        finally:
            # Invariant: once `died` is set no call is left waiting on this
            # connection; every one still running is cancelled right here.
            connection.died.set()
            for scope in connection.calls:
                scope.cancel()

    async def _run_on(
        self,
        connection: _Connection,
        instance: InstanceView,
        fn: Callable[[Channel], Awaitable[T]],
        deadline: float,
    ) -> T:
        assert connection.channel is not None
        # One scope for the pool's deadline and the connection's death (its
        # task cancels the scopes of the calls on it, after setting `died`).
        with trio.CancelScope(deadline=deadline) as scope:
            connection.calls.add(scope)
            self._changed()
            try:
                if connection.died.is_set():
                    scope.cancel()
                return await fn(connection.channel)
            except BaseException as exc:
                failure = rpc_failure(exc, connection.channel.target)
                if failure is None:
                    raise
                if isinstance(failure, RpcStatusError):
                    if failure is exc:
                        raise
                    raise failure from None
                # A broken transport: drop the connection so the next call reconnects.
                connection.close_requested.set()
                reason = str(failure).removeprefix(f"{connection.channel.target}: ")
                raise self._unavailable(instance, reason) from None
            finally:
                connection.calls.discard(scope)
                self._changed()
        # Only reached when the scope was cancelled: the connection died mid-call, or time ran out.
        if connection.died.is_set():
            raise self._unavailable(instance, f"connection lost: {connection.reason or 'closed'}")
        raise _timed_out()

    def _unavailable(self, instance: InstanceView, reason: str) -> RpcStatusError:
        return status_error(
            StatusCode.UNAVAILABLE,
            f"Instance '{instance.name}' ({self.host}:{instance.port}) is unavailable: {reason}",
        )


def _timed_out() -> RpcStatusError:
    """The pool's own deadline passed (tei-manager's words)."""
    return status_error(StatusCode.DEADLINE_EXCEEDED, "Request timeout")
