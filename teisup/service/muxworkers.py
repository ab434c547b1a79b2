"""The multiplexer's worker processes, seen from the manager: `WorkerGroup` and its children.

With ``grpc_workers`` = N > 1 the root supervisor has N children
``grpc-worker-0`` .. ``grpc-worker-N-1`` in place of ``grpc``. Each is one
process (`teisup.grpc.worker`), spawned through the instance layer's
`teisup.instances.ProcessSpawner` (the one place processes are made: parent
death signal from its long-lived thread, the subreaper shim), so kill -9 of
the manager takes the workers too. The child:

* sends the worker its `teisup.grpc.WorkerSetup` and the current
  `teisup.grpc.RoutingView`, and is ready once the worker answers that it is
  bound (a bind error fails the start, as the in-process server's does, and
  so does no answer within ``start_timeout``);
* sends a new view on every transition of the tree (subscribed before the
  first view, so none is missed), on `WorkerGroup.changed` (an instance
  created or deleted) and every ``health_interval`` seconds, and
  `teisup.grpc.Reload` when the manager gets SIGHUP (`WorkerGroup.reload`);
* counts every request the worker reports in the manager's metrics, so
  ``/metrics`` has the same series whichever process served a call;
* fails (and is restarted with backoff) when the process exits by itself; on a
  stop it closes the worker's stdin, the worker's cue to leave, and kills its
  process group after ``grace`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any

import trio

from ..grpc import (
    FrameDecoder,
    Reload,
    RequestBatch,
    RoutingView,
    WorkerFailed,
    WorkerReady,
    WorkerSetup,
    encode_message,
    routing_view,
)
from ..instances import (
    INSTANCE_MARKER,
    MANAGER_MARKER,
    ProcessSpawner,
    kill_group,
    wait_for_exit,
)
from ..supervision import Backoff, ChildContext, ChildSpec

__all__ = ["WORKER_MODULE", "WorkerCrashed", "WorkerGroup"]

logger = logging.getLogger("teisup.grpc.workers")

WORKER_MODULE = "teisup.grpc.worker"
"""The module a worker process runs (``python -m``)."""

#: Quick to come back from one crash, slower when they repeat.
WORKER_BACKOFF = Backoff(initial=0.1, factor=2.0, maximum=10.0, reset_after=30.0)

_LEVELS = {"DEBUG": logging.DEBUG, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


class WorkerCrashed(Exception):
    """A worker process exited by itself (or could not start serving)."""


class WorkerGroup:
    """The ``grpc-worker-*`` children of the root, and what they share.

    ``setup(index)`` makes each worker's `WorkerSetup`; ``records`` reads the
    instances (the manager's ``all``); ``on_requests`` takes the requests a
    worker served (the metrics' ``request_done``, for each).
    """

    def __init__(
        self,
        count: int,
        *,
        setup: Callable[[int], WorkerSetup],
        spawner: ProcessSpawner,
        records: Callable[[], Sequence[Any]],
        on_request: Callable[[Any], None],
        environ: dict[str, str],
        manager_id: str,
        health_interval: float = 5.0,
        grace: float = 10.0,
        start_timeout: float = 120.0,
    ) -> None:
        self.count = count
        self._setup = setup
        self._spawner = spawner
        self._records = records
        self._on_request = on_request
        self._environ = environ
        self._manager_id = manager_id
        self._health_interval = health_interval
        self._grace = grace
        self._start_timeout = start_timeout
        self._seq = 0
        self._reloads: list[trio.MemorySendChannel[Reload]] = []
        self._nudges: list[trio.MemorySendChannel[None]] = []
        #: Worker index -> pid of its process while it serves.
        self.pids: dict[int, int] = {}
        self._in_flight: dict[int, dict[str, int]] = {}

    def in_flight(self, name: str) -> int:
        """Calls to instance ``name`` in flight in the workers, as they last reported."""
        return sum(counts.get(name, 0) for counts in self._in_flight.values())

    def specs(self) -> list[ChildSpec]:
        """One child spec per worker, for the root supervisor."""
        return [
            ChildSpec(
                f"grpc-worker-{i}",
                partial(self.run_worker, i),
                shutdown=self._grace + 5.0,
                backoff=WORKER_BACKOFF,
                # The first binds the port before the root goes on (a taken
                # port fails the start); the others start alongside.
                await_ready=i == 0,
            )
            for i in range(self.count)
        ]

    def changed(self) -> None:
        """Send every worker a new view now: the instances changed without a transition
        (one created stopped, or deleted)."""
        for channel in list(self._nudges):
            # Full: a view is due already, and it reads the instances when sent.
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                channel.send_nowait(None)

    def reload(self) -> None:
        """Have every running worker load the TLS files again."""
        for channel in list(self._reloads):
            # Full: one is queued already; broken or closed: the worker is going.
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                channel.send_nowait(Reload())

    def view(self) -> RoutingView:
        """The routing view now, numbered after every earlier one."""
        self._seq += 1
        return routing_view(self._records(), self._seq)

    def check_port(self, host: str, port: int) -> None:
        """Raise OSError (EADDRINUSE) if ``port`` is taken by anything but our workers.

        SO_REUSEPORT lets any process of the same user bind a port its sockets
        share, so a second teisup would silently take half the connections;
        a plain bind, made while none of our workers holds the port, tells.
        """
        if self.pids:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))

    async def run_worker(self, index: int, ctx: ChildContext) -> None:
        """The ``grpc-worker-<index>`` child: one worker process, fed and watched."""
        setup = self._setup(index)
        self.check_port(setup.host, setup.port)
        env = dict(self._environ)
        env[MANAGER_MARKER] = self._manager_id
        env[INSTANCE_MARKER] = f"grpc-worker-{index}"
        env["PYTHONUNBUFFERED"] = "1"
        process = await self._spawner.spawn([sys.executable, "-m", WORKER_MODULE], env, stdin=True)
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        to_worker = trio.lowlevel.FdStream(os.dup(process.stdin.fileno()))
        from_worker = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        log = trio.lowlevel.FdStream(os.dup(process.stderr.fileno()))
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        reloads_in, reloads_out = trio.open_memory_channel[Reload](1)
        self._reloads.append(reloads_in)
        crashed: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump_log, log, index)
                with ctx.bus.subscribe() as changes:
                    await to_worker.send_all(encode_message(setup) + encode_message(self.view()))
                    decoder = FrameDecoder()
                    ready = await self._wait_ready(from_worker, decoder, process)
                    self.pids[index] = ready.pid
                    logger.info(
                        "gRPC worker %d (pid %d) serving on %s:%d",
                        index,
                        ready.pid,
                        setup.host,
                        ready.port,
                    )
                    ctx.started()
                    nursery.start_soon(_until_broken, self._feed, to_worker, changes, reloads_out)
                    nursery.start_soon(_until_broken, self._collect, index, from_worker, decoder)
                    exited = trio.Event()
                    nursery.start_soon(_wait_exit, process, exited)
                    with trio.CancelScope() as waiting:
                        nursery.start_soon(_cancel_on, exited, waiting)
                        await ctx.wait_stop_requested()
                    if exited.is_set():
                        crashed = f"gRPC worker {index} exited ({_describe(process.returncode)})"
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failure (the start's OSError, a bad frame) reads better bare.
            leaves = list(_leaves(group))
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
        finally:
            self.pids.pop(index, None)
            self._in_flight.pop(index, None)
            self._reloads.remove(reloads_in)
            with trio.CancelScope(shield=True):
                await to_worker.aclose()  # end of its stdin: the worker leaves
                await from_worker.aclose()
                with trio.move_on_after(self._grace):
                    await wait_for_exit(process)
                if process.returncode is None:
                    kill_group(process.pid, signal.SIGKILL)
                    await wait_for_exit(process)
                await log.aclose()
        if crashed is not None:
            raise WorkerCrashed(crashed)

    async def _wait_ready(
        self,
        stream: trio.abc.ReceiveStream,
        decoder: FrameDecoder,
        process: subprocess.Popen[bytes],
    ) -> WorkerReady:
        with trio.move_on_after(self._start_timeout):
            return await _first_answer(stream, decoder, process)
        raise WorkerCrashed(
            f"gRPC worker (pid {process.pid}) did not start serving within "
            f"{self._start_timeout:g} s"
        )

    async def _feed(
        self,
        out: trio.abc.SendStream,
        changes: trio.MemoryReceiveChannel[Any],
        reloads: trio.MemoryReceiveChannel[Reload],
    ) -> None:
        # One slot: whatever comes while a view is due is in that view too.
        nudge_in, nudge_out = trio.open_memory_channel[None](1)
        self._nudges.append(nudge_in)

        async def transitions() -> None:
            async for _ in changes:
                with contextlib.suppress(trio.WouldBlock):
                    nudge_in.send_nowait(None)

        async def views() -> None:
            interval = self._health_interval if self._health_interval > 0 else math.inf
            while True:
                with trio.move_on_after(interval):
                    await nudge_out.receive()
                await out.send_all(encode_message(self.view()))

        async def forward_reloads() -> None:
            async for message in reloads:
                await out.send_all(encode_message(message))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transitions)
                nursery.start_soon(views)
                nursery.start_soon(forward_reloads)
        finally:
            self._nudges.remove(nudge_in)

    async def _collect(
        self, index: int, stream: trio.abc.ReceiveStream, decoder: FrameDecoder
    ) -> None:
        while data := await stream.receive_some():
            for message in decoder.feed(data):
                if isinstance(message, RequestBatch):
                    self._in_flight[index] = message.in_flight
                    for record in message.unpack():
                        self._on_request(record)


async def _first_answer(
    stream: trio.abc.ReceiveStream, decoder: FrameDecoder, process: subprocess.Popen[bytes]
) -> WorkerReady:
    while True:
        data = await stream.receive_some()
        if not data:
            code = await wait_for_exit(process)
            raise WorkerCrashed(f"gRPC worker exited before serving ({_describe(code)})")
        for message in decoder.feed(data):
            if isinstance(message, WorkerReady):
                return message
            if isinstance(message, WorkerFailed):
                if message.errno is not None:
                    raise OSError(message.errno, message.message)
                raise WorkerCrashed(f"gRPC worker could not start: {message.message}")


async def _until_broken(work: Callable[..., Awaitable[None]], *args: Any) -> None:
    # The worker is gone (or going): its exit, watched on its own, says how.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await work(*args)


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _wait_exit(process: subprocess.Popen[bytes], exited: trio.Event) -> None:
    await wait_for_exit(process)
    exited.set()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _pump_log(stream: trio.abc.ReceiveStream, index: int) -> None:
    buffer = b""
    while data := await stream.receive_some():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            level, _, rest = text.partition(" ")
            logger.log(_LEVELS.get(level, logging.INFO), "worker %d: %s", index, rest or text)


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"
