"""The multiplexer as a server: `Multiplexer` (serve it, or run it as a supervised child).

It serves, on one host and port (`teisup.rpc.Server`: no SO_REUSEPORT unless
asked, for the worker processes that share the port; a taken port fails at
start, sockets closed on stop):

* ``tei_multiplexer.v1.TeiMultiplexer`` (`MultiplexerService`);
* ``grpc.health.v1.Health``: ``""`` and the multiplexer's service name are
  SERVING while it runs; each instance name is SERVING while the instance is
  ``running`` and NOT_SERVING otherwise, so a client can Watch one instance.
  The table is refreshed on every transition of the supervision tree (under
  `Multiplexer.run`) and every ``health_interval`` seconds;
* ``grpc.reflection.v1alpha.ServerReflection`` and ``v1``, listing the multiplexer, the
  ``tei.v1`` services whose messages it uses (as tei-manager's reflection
  does), health and reflection, so ``grpcurl -plaintext HOST:PORT list`` and
  ``describe`` work.
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
from typing import Any

import trio

from teisup.rpc import (
    DEFAULT_HOST,
    DEFAULT_MAX_MESSAGE_LENGTH,
    Authorizer,
    HealthServicer,
    ReflectionService,
    ReflectionServiceV1,
    Server,
    ServingStatus,
)
from teisup.supervision import ChildContext

from .handlers import SERVICE_NAME
from .pool import BackendPool
from .routing import READY_STATUS
from .service import InstanceSource, MultiplexerService

__all__ = ["DEFAULT_PORT", "Multiplexer", "serve_multiplexer"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9001
"""tei-manager's ``grpc_port``."""

REFLECTED_SERVICES = (
    SERVICE_NAME,
    "tei.v1.Info",
    "tei.v1.Embed",
    "tei.v1.Predict",
    "tei.v1.Rerank",
    "tei.v1.Tokenize",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class Multiplexer:
    """The gRPC multiplexer: its server, backend pool, health and reflection.

    ``instances`` is the `teisup.instances.InstanceManager` (or anything with
    its ``all()``). Run it with `serve` in a nursery, or as a supervised child
    with `run`::

        mux = Multiplexer(manager, host="0.0.0.0", port=config.grpc_port)
        ChildSpec("grpc", mux.run)

    ``default_timeout`` bounds unary and Arrow calls without a client deadline
    (0: no bound); ``stream_idle_timeout`` ends a stream with nothing moving
    for that long; ``queue_timeout`` is how long a call waits for one of the
    instance's ``max_concurrent_requests`` slots before RESOURCE_EXHAUSTED;
    ``connect_timeout`` bounds connecting to an instance;
    ``max_message_length`` bounds one message each way, from clients and from
    backends (RESOURCE_EXHAUSTED past it). With ``data_plane``, the
    multiplexer serves that `MultiplexerService` (and its pool, which its
    owner runs) instead of making its own. ``ssl_context`` serves TLS;
    ``authorize`` may refuse a call (see `teisup.rpc.Server`); ``reuse_port``
    shares the port with other processes (``grpc_workers``: each worker
    process serves one `Multiplexer` over a `teisup.grpc.ViewSource`).
    """

    def __init__(
        self,
        instances: InstanceSource,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        backend_host: str = "127.0.0.1",
        default_timeout: float = 30.0,
        stream_idle_timeout: float = 300.0,
        queue_timeout: float = 1.0,
        connect_timeout: float = 5.0,
        health_interval: float = 5.0,
        max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        data_plane: MultiplexerService | None = None,
        ssl_context: ssl.SSLContext | None = None,
        authorize: Authorizer | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.instances = instances
        if data_plane is None:
            pool = BackendPool(
                host=backend_host,
                connect_timeout=connect_timeout,
                queue_timeout=queue_timeout,
                max_message_length=max_message_length,
            )
            data_plane = MultiplexerService(
                instances,
                pool,
                default_timeout=default_timeout,
                stream_idle_timeout=stream_idle_timeout,
            )
            self._owns_pool = True
        else:
            # Shared with another front end (the HTTP data plane), whose owner runs the pool.
            self._owns_pool = False
        self.service = data_plane
        self.pool = data_plane.pool
        self.health = HealthServicer(
            {"": ServingStatus.SERVING, SERVICE_NAME: ServingStatus.SERVING}
        )
        self.health_interval = health_interval
        self.server = Server(
            port,
            host=host,
            ssl_context=ssl_context,
            max_message_length=max_message_length,
            authorize=authorize,
            reuse_port=reuse_port,
        )
        self.server.add_service(self.service.service)
        self.server.add_service(self.health)
        self.server.add_service(ReflectionService(list(REFLECTED_SERVICES)))
        self.server.add_service(ReflectionServiceV1(list(REFLECTED_SERVICES)))

    @property
    def port(self) -> int:
        """The port asked for, or the bound one once serving."""
        return self.server.port

    def refresh_health(self) -> None:
        """Bring the per-instance health statuses up to date with the instances."""
        known = {SERVICE_NAME, ""}
        for record in self.instances.all():
            known.add(record.name)
            serving = record.status is READY_STATUS
            self.health.set_status(
                record.name, ServingStatus.SERVING if serving else ServingStatus.NOT_SERVING
            )
        for name in [n for n in self.health.statuses if n not in known]:
            self.health.clear_status(name)
        self.pool.retain(n for n in known if n not in (SERVICE_NAME, ""))

    async def serve(
        self,
        *,
        changes: trio.MemoryReceiveChannel[Any] | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the port through ``task_status``, serve until cancelled.

        Raises OSError (EADDRINUSE for a taken port) before reporting, so
        ``nursery.start`` raises it. ``changes``, when given, is a channel
        whose every item (a transition event) triggers a health refresh.
        """
        bind_error: OSError | None = None
        async with trio.open_nursery() as nursery:
            if self._owns_pool:
                await nursery.start(self.pool.run)
            self.refresh_health()
            try:
                port = await nursery.start(self.server.serve_async)
            except OSError as exc:
                # Raised bare, not wrapped in this nursery's group, so the
                # caller's nursery.start sees the OSError (EADDRINUSE) itself.
                bind_error = exc
                nursery.cancel_scope.cancel()
            else:
                log.info("gRPC multiplexer listening on %s:%d", self.server.host, port)
                nursery.start_soon(self._watch_health, changes)
                task_status.started(port)
        if bind_error is not None:
            raise bind_error

    async def _watch_health(self, changes: trio.MemoryReceiveChannel[Any] | None) -> None:
        interval = self.health_interval if self.health_interval > 0 else math.inf
        while True:
            with trio.move_on_after(interval):
                if changes is None:
                    await trio.sleep_forever()
                else:
                    await changes.receive()
            self.refresh_health()

    async def run(self, ctx: ChildContext) -> None:
        """Run as a supervised child: ready once bound, return when asked to stop.

        Stopping cancels the server (no drain: clients retry elsewhere): calls in
        flight end, listener and connections are closed.
        """
        with ctx.bus.subscribe() as changes:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(self.serve, changes=changes))
                ctx.started()
                await ctx.wait_stop_requested()
                nursery.cancel_scope.cancel()


async def serve_multiplexer(
    instances: InstanceSource,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    default_timeout: float = 30.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a `Multiplexer` over ``instances`` until cancelled; report its port."""
    mux = Multiplexer(instances, host=host, port=port, default_timeout=default_timeout)
    await mux.serve(task_status=task_status)
