"""The data plane both front ends share: `MultiplexerService`.

The gRPC multiplexer (`teisup.grpc.handlers`) and the HTTP data plane
(`teisup.api`) both serve requests through one `MultiplexerService`, so every
request obeys the same routing (`teisup.grpc.routing`), in-flight caps and
connections (`teisup.grpc.pool`), deadlines and metrics (`observe`):

* `route`: a ``Target`` to an instance record, or the routing status;
* `forward`: one unary ``tei.v1`` call, with a retry on another replica
  when routed by ``model_id`` and the first answers UNAVAILABLE;
* `stream_all`: many requests over one backend stream, pipelined, the
  answers in order (a short answer is INTERNAL);
* `call` / `call_target`: any call on an instance's connection;
* `observe`: time and report one request.

Deadlines: a client's deadline bounds the whole call and is passed on to the
backend; without one, a unary, batch or Arrow call gets ``default_timeout``
(0: none). Errors from the backend keep their code and message.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import trio

from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2
from teisup.rpc import Channel, ClientStream, RpcStatusError, Service, StatusCode, status_error

from ..supervision import ChildState
from .handlers import multiplexer_service
from .observe import RequestObserver, RequestRecord, current_request, observed
from .pool import BackendPool
from .routing import Replica, RoutingError, resolve

__all__ = [
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "InstanceRecord",
    "InstanceSource",
    "MultiplexerService",
]

T = TypeVar("T")

DEFAULT_MAX_CONCURRENT_REQUESTS = 512
"""TEI's default, for an instance record that does not say."""


class InstanceRecord(Protocol):
    """One instance as the multiplexer reads it (`teisup.instances.InstanceInfo` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def status(self) -> ChildState: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def spec(self) -> Any: ...  # anything with ``max_concurrent_requests``


class InstanceSource(Protocol):
    """Where instances come from (`teisup.instances.InstanceManager` fits)."""

    def all(self) -> Sequence[InstanceRecord]: ...


class MultiplexerService:
    """The data plane over an `InstanceSource` and a `BackendPool`.

    `service` is the ``tei_multiplexer.v1.TeiMultiplexer`` `teisup.rpc.Service`
    the gRPC server adds; the other methods are what every front end calls.
    Every request is reported to ``observer``.
    """

    def __init__(
        self,
        instances: InstanceSource,
        pool: BackendPool,
        *,
        default_timeout: float = 30.0,
        stream_idle_timeout: float = 300.0,
        observer: RequestObserver | None = None,
    ) -> None:
        self.instances = instances
        self.pool = pool
        self.default_timeout = default_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.observer = observer
        self._picks = 0
        self._last_picked: dict[str, int] = {}

    @property
    def service(self) -> Service:
        """``tei_multiplexer.v1.TeiMultiplexer`` with every RPC of the contract."""
        return multiplexer_service(self)

    def observe(self, transport: str, method: str) -> AbstractContextManager[RequestRecord]:
        """Time the block as one request of ``transport`` and report it (see `observed`)."""
        return observed(self.observer, transport, method)

    def route(
        self, target: mux_pb2.Target | None, *, exclude: frozenset[str] = frozenset()
    ) -> InstanceRecord:
        """The instance for ``target``, or the routing error as a gRPC status.

        Instances in ``exclude`` are left out, as if they did not exist.
        """
        records = {r.name: r for r in self.instances.all() if r.name not in exclude}
        replicas = [Replica(r.name, r.model_id, r.status) for r in records.values()]
        try:
            name = resolve(
                target,
                replicas,
                outstanding={n: self.pool.outstanding(n) for n in records},
                last_picked=self._last_picked,
            )
        except RoutingError as exc:
            named = target.instance_name if target is not None else ""
            current = current_request()
            if current is not None and named in records:
                # A request that named an existing instance is counted against it.
                current.instance = named
            raise status_error(exc.code, exc.message) from None
        self._picks += 1
        self._last_picked[name] = self._picks
        current = current_request()
        if current is not None:
            current.instance = name
        return records[name]

    async def call(
        self,
        record: InstanceRecord,
        fn: Callable[[Channel], Awaitable[T]],
        *,
        timeout: float | None,  # noqa: ASYNC109 - the pool's own deadline, see BackendPool.call
    ) -> T:
        """Run ``fn(channel)`` on ``record``'s connection under its in-flight cap.

        ``timeout`` None: no deadline of the pool's own (the caller's applies).
        """
        limit = getattr(record.spec, "max_concurrent_requests", None)
        return await self.pool.call(
            record, fn, limit=limit or DEFAULT_MAX_CONCURRENT_REQUESTS, timeout=timeout
        )

    async def call_target(
        self,
        target: mux_pb2.Target | None,
        fn: Callable[[Channel], Awaitable[T]],
        *,
        timeout: float | None,  # noqa: ASYNC109 - see call
        routed: InstanceRecord | None = None,
    ) -> T:
        """Route ``target`` (unless already ``routed``) and `call`; fail over once.

        Routed by ``model_id``, a call that fails UNAVAILABLE (the replica
        died, or is draining to restart) is run once more on another ready
        replica, if there is one: the forwarded unary RPCs only read, so
        running one twice is harmless. Otherwise the error stands.
        """
        record = routed if routed is not None else self.route(target)
        try:
            return await self.call(record, fn, timeout=timeout)
        except RpcStatusError as exc:
            by_model = target is not None and target.WhichOneof("routing") == "model_id"
            if not by_model or exc.code != StatusCode.UNAVAILABLE:
                raise
            try:
                other = self.route(target, exclude=frozenset({record.name}))
            except RpcStatusError:
                raise exc from None
            return await self.call(other, fn, timeout=timeout)

    async def forward(
        self,
        target: mux_pb2.Target | None,
        service: str,
        method: str,
        request: Any,
        response_type: Any,
        *,
        routed: InstanceRecord | None = None,
    ) -> Any:
        """One unary ``service/method`` call on the instance for ``target`` (`call_target`)."""

        async def call(channel: Channel) -> Any:
            return await channel.unary(service, method, request, response_type)

        return await self.call_target(target, call, timeout=self.unary_timeout(), routed=routed)

    async def stream_all(
        self,
        record: InstanceRecord,
        service: str,
        method: str,
        requests: Sequence[Any],
        response_type: Any,
    ) -> list[Any]:
        """Send ``requests`` over one streaming call, pipelined; the answers in order.

        One in-flight slot for the whole batch; the deadline is the caller's,
        or `default_timeout` without one. A short answer is INTERNAL, never a
        misaligned result.
        """
        request_type = type(requests[0]) if requests else None
        answers: list[Any] = []

        async def call(channel: Channel) -> None:
            async with (
                channel.stream(service, method, request_type, response_type) as backend,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_send_all, backend, requests)
                while (answer := await backend.receive()) is not None:
                    answers.append(answer)

        if requests:
            await self.call(record, call, timeout=self.unary_timeout())
        if len(answers) != len(requests):
            # Output row i must be input row i's answer; a short answer is a bug upstream.
            raise status_error(
                StatusCode.INTERNAL,
                f"the backend answered {len(answers)} rows for {len(requests)} texts",
            )
        return answers

    def unary_timeout(self) -> float | None:
        """The pool deadline for a unary call: none under a client deadline, else the default."""
        # A client deadline is already the handler's (the server enforces it);
        # only calls without one get the default.
        if not math.isinf(trio.current_effective_deadline()):
            return None
        return self.default_timeout or None


async def _send_all(backend: ClientStream, requests: Sequence[Any]) -> None:
    for message in requests:
        await backend.send(message)
    await backend.done_sending()
