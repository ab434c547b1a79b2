"""One worker process of the multiplexer: ``python -m teisup.grpc.worker``.

Started by the manager (`teisup.service.muxworkers`, through the instance
layer's spawner, under the subreaper shim), it talks to the manager over its
stdin and stdout only (`teisup.grpc.feed`): it reads a `WorkerSetup`, binds the
multiplexer's port with SO_REUSEPORT on the configured host, answers
`WorkerReady` (or `WorkerFailed`), and then serves, routing by the latest
`RoutingView` the manager sent. Every request it serves goes back to the
manager in a `RequestBatch`, so the manager's ``/metrics`` counts it. It
leaves when its stdin closes (the manager stopped it, or died: the shim kills
it then anyway). Its log goes to stderr, which the manager logs as its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import sys

import trio

from ..security import AllowList, TlsError, TlsReloader
from .feed import (
    FeedError,
    FrameDecoder,
    Reload,
    RequestBatch,
    RoutingView,
    ViewSource,
    WorkerFailed,
    WorkerReady,
    WorkerSetup,
    encode_message,
)
from .gate import GrpcGate
from .observe import RequestRecord
from .pool import BackendPool
from .server import Multiplexer
from .service import MultiplexerService

__all__ = ["main", "serve_worker"]

logger = logging.getLogger("teisup.grpc.worker")

#: At most this many records in one batch to the manager.
_BATCH = 4096
#: With no request finishing, the calls in flight are reported this often.
_IN_FLIGHT_EVERY = 1.0
#: After a batch, what finishes within this long goes in the next one: under
#: load, a few batches a second, not one message per call.
_COALESCE = 0.01


class _Reporter:
    """Collects finished requests; the flusher sends them to the manager in batches,
    with the calls in flight per instance (``in_flight``: the pool's count)."""

    def __init__(self, source: ViewSource, pool: BackendPool) -> None:
        self.pending: list[RequestRecord] = []
        self.wake = trio.Event()
        self._source = source
        self._pool = pool

    def request_done(self, record: RequestRecord) -> None:
        self.pending.append(record)
        self.wake.set()

    def _in_flight(self) -> dict[str, int]:
        counts = {r.name: self._pool.in_flight(r.name) for r in self._source.all()}
        return {name: n for name, n in counts.items() if n}

    async def flush_forever(self, out: trio.abc.SendStream) -> None:
        reported: dict[str, int] = {}
        while True:
            with trio.move_on_after(_IN_FLIGHT_EVERY):
                await self.wake.wait()
            self.wake = trio.Event()
            in_flight = self._in_flight()
            if not self.pending and in_flight == reported:
                continue
            reported = in_flight
            while True:
                batch, self.pending = self.pending[:_BATCH], self.pending[_BATCH:]
                await out.send_all(encode_message(RequestBatch.of(batch, in_flight)))
                if not self.pending:
                    break
            await trio.sleep(_COALESCE)


async def serve_worker(inbox: trio.abc.ReceiveStream, outbox: trio.abc.SendStream) -> int:
    """Serve as one worker until ``inbox`` ends; the process's exit status."""
    decoder = FrameDecoder()
    pending: list[object] = []
    while not pending:
        data = await inbox.receive_some()
        if not data:
            return 0
        pending.extend(decoder.feed(data))
    setup = pending.pop(0)
    if not isinstance(setup, WorkerSetup):
        raise FeedError(f"expected the setup first, got {type(setup).__name__}")
    source = ViewSource(setup.workers)
    pool = BackendPool(
        queue_timeout=setup.queue_timeout, max_message_length=setup.max_message_length
    )
    reporter = _Reporter(source, pool)
    data_plane = MultiplexerService(
        source,
        pool,
        default_timeout=setup.default_timeout,
        stream_idle_timeout=setup.stream_idle_timeout,
        observer=reporter,
    )
    tls: TlsReloader | None = None
    allow_list = AllowList(frozenset(), frozenset())
    if setup.tls is not None and setup.tls.enabled:
        tls = TlsReloader(setup.tls)
        tls.reload()
        allow_list = AllowList.of(setup.tls)
    gate = GrpcGate(api_token=setup.api_token, allow_list=allow_list, tls=tls is not None)
    mux = Multiplexer(
        source,
        host=setup.host,
        port=setup.port,
        health_interval=setup.health_interval,
        max_message_length=setup.max_message_length,
        data_plane=data_plane,
        ssl_context=tls.context(alpn=["h2"]) if tls else None,
        authorize=gate,
        reuse_port=True,
    )
    changes_in, changes_out = trio.open_memory_channel[object](64)

    def take(message: object) -> None:
        if isinstance(message, RoutingView):
            if source.update(message):
                # When full, a refresh is queued already; it reads the latest view.
                with contextlib.suppress(trio.WouldBlock):
                    changes_in.send_nowait(message.seq)
        elif isinstance(message, Reload):
            if tls is None:
                logger.info("SIGHUP: nothing to reload (no TLS configured)")
                return
            try:
                tls.reload()
            except (TlsError, ssl.SSLError) as exc:
                logger.error("SIGHUP: TLS files not reloaded, the old ones stay: %s", exc)
            else:
                logger.info("SIGHUP: TLS certificate reloaded (new connections use it)")
        else:
            raise FeedError(f"unexpected message from the manager: {type(message).__name__}")

    for message in pending:
        take(message)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            port = await nursery.start(
                lambda task_status: mux.serve(changes=changes_out, task_status=task_status)
            )
        except OSError as exc:
            await outbox.send_all(encode_message(WorkerFailed(str(exc), exc.errno)))
            nursery.cancel_scope.cancel()
            return 1
        await outbox.send_all(encode_message(WorkerReady(port, os.getpid())))
        nursery.start_soon(reporter.flush_forever, outbox)
        while data := await inbox.receive_some():
            for message in decoder.feed(data):
                take(message)
        nursery.cancel_scope.cancel()
    return 0


def main() -> int:
    """The worker process: the feed on fds 0 and 1, the log on stderr."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # The manager forwards SIGHUP as a message; the signal itself must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    inbox_fd = os.dup(0)
    outbox_fd = os.dup(1)
    # Nothing else may write into the feed: stray prints go to the log.
    os.dup2(2, 1)

    async def run() -> int:
        inbox = trio.lowlevel.FdStream(inbox_fd)
        outbox = trio.lowlevel.FdStream(outbox_fd)
        async with inbox, outbox:
            return await serve_worker(inbox, outbox)

    try:
        return trio.run(run)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
