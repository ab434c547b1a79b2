"""The root supervisor's small workers: each a `teisup.supervision.Worker`.

``observer`` (transitions into the state writer and the metrics), ``api``
(hypercorn serving the REST and HTTP data planes), ``backends`` (the data
plane's connection pool), ``reload`` (SIGHUP), ``poller`` (GPU readings) and
``reaper`` (adopted orphans). The state writer, the instances supervisor, the
multiplexer and ``restore`` are workers of their own modules.
"""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from ..grpc import BackendPool
from ..instances import GpuInfo, InstanceManager, NvmlReader
from ..security import TlsError, TlsReloader
from ..supervision import ChildContext
from .metrics import Metrics
from .writer import StateWriter

__all__ = ["ApiServer", "GpuPoller", "observe", "reap", "reload_on_sighup", "run_pool"]

logger = logging.getLogger("teisup")


async def observe(writer: StateWriter, metrics: Metrics, ctx: ChildContext) -> None:
    """Every transition in the tree: a snapshot may have changed, and metrics count it."""
    with ctx.bus.subscribe() as subscription:
        ctx.started()
        async for event in subscription:
            writer.mark_dirty()
            metrics.on_transition(event)


class ApiServer:
    """The ``api`` worker: one hypercorn server for the REST and HTTP data planes."""

    def __init__(self, app: Callable[[], Any], config: hypercorn.config.Config) -> None:
        self._app = app
        self._config = config
        #: Where it listens, once started.
        self.urls: list[str] = []

    async def run(self, ctx: ChildContext) -> None:
        """Serve until asked to stop; ready once bound."""
        app = self._app()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    app,
                    self._config,
                    shutdown_trigger=ctx.wait_stop_requested,
                )
            )
            self.urls = list(binds)
            logger.info("REST API listening on %s", ", ".join(self.urls))
            ctx.started()


async def run_pool(pool: BackendPool, ctx: ChildContext) -> None:
    """The ``backends`` worker: the data plane's connections, for as long as it runs."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        ctx.started()
        await ctx.wait_stop_requested()
        nursery.cancel_scope.cancel()


async def reload_on_sighup(
    tls: TlsReloader | None,
    cert: str | None,
    ctx: ChildContext,
    *,
    also: Callable[[], None] | None = None,
) -> None:
    """The ``reload`` worker: on SIGHUP, load the certificate files again (new handshakes).

    ``also`` runs on each SIGHUP too (the multiplexer's workers reload theirs).
    """
    # Always listening: SIGHUP's default action would end teisup abruptly.
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        ctx.started()
        async for _ in signals:
            if also is not None:
                also()
            if tls is None:
                logger.info("SIGHUP: nothing to reload (no TLS configured)")
                continue
            try:
                tls.reload()
            except (TlsError, ssl.SSLError) as exc:
                logger.error("SIGHUP: TLS files not reloaded, the old ones stay: %s", exc)
            else:
                logger.info(
                    "SIGHUP: TLS certificate reloaded from %s (new connections use it)", cert
                )


class GpuPoller:
    """The ``poller`` worker: GPU readings every ``interval`` seconds, for /gpus and /metrics."""

    def __init__(self, reader: NvmlReader, interval: float = 10.0) -> None:
        #: Where the readings come from (the instance manager validates GPU ids with it too).
        self.reader = reader
        self._interval = interval
        self._readings: list[GpuInfo] = []

    def readings(self) -> list[GpuInfo]:
        """The latest readings (empty before the first, or without a driver)."""
        return list(self._readings)

    async def run(self, ctx: ChildContext) -> None:
        """Read, then keep reading; ready after the first reading."""
        while True:
            self._readings = await trio.to_thread.run_sync(self.reader.read)
            ctx.started()
            await trio.sleep(self._interval)


async def reap(manager: InstanceManager, ctx: ChildContext) -> None:
    """The ``reaper`` worker: reap the orphans the manager adopts as subreaper (or PID 1)."""
    ctx.started()
    await manager.reap_orphans()
