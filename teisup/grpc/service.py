"""The ``tei_multiplexer.v1.TeiMultiplexer`` service: every RPC forwarded to an instance.

Each request names a `Target`; `teisup.grpc.routing` turns it into an
instance and `teisup.grpc.pool` runs the backend call. What each kind of RPC
does:

* **Unary** (Info, Embed, EmbedSparse, EmbedAll, Predict, PredictPair, Rerank,
  Tokenize, Decode): target first, then the inner ``request`` (absent:
  INVALID_ARGUMENT ``Missing <kind> request``, tei-manager's words), then one
  call to the same-named ``tei.v1`` RPC. Info sends ``tei.v1.InfoRequest{}``.
* **Streams** (EmbedStream, EmbedSparseStream, EmbedAllStream, PredictStream,
  PredictPairStream, TokenizeStream, DecodeStream, and RerankStream, which is
  client-streaming): the first message's target picks the instance for the
  whole stream (an empty stream: INVALID_ARGUMENT ``Empty stream``); later
  targets are ignored and messages without ``request`` skipped, as in
  tei-manager. Requests and responses flow both ways at once, in order.
* **Arrow** (EmbedArrow, EmbedSparseArrow): see `teisup.grpc.arrow`; the rows
  go to the backend over one ``EmbedStream`` / ``EmbedSparseStream``, pipelined,
  and come back in order. ``noop`` validates the target but calls nobody.

Deadlines: a client's ``grpc-timeout`` bounds the whole call (the server
cancels the handler at it: DEADLINE_EXCEEDED) and is passed on to the backend.
Without one, a unary or Arrow call gets ``default_timeout`` (0: none). Every
stream, with a client deadline or not, also gets ``stream_idle_timeout``: it
ends with DEADLINE_EXCEEDED once no message has moved either way for that long.

Errors from the backend keep their code and message.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import purerpc
import trio
from purerpc import Cardinality, RPCSignature, StatusCode

from teisup.proto.tei.v1 import tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2
from teisup.rpc import Channel

from ..supervision import ChildState
from . import arrow
from .observe import RequestObserver, current_request, observed
from .pool import BackendPool, BackendStream, open_stream, status_error, unary
from .routing import Replica, RoutingError, resolve, validate_target

__all__ = [
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "SERVICE_NAME",
    "InstanceRecord",
    "InstanceSource",
    "MultiplexerService",
]

SERVICE_NAME = "tei_multiplexer.v1.TeiMultiplexer"

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


@dataclass(frozen=True, slots=True)
class _Forward:
    """One forwarded RPC: the multiplexer's method and the backend's."""

    method: str
    cardinality: Any
    request_type: Any
    response_type: Any
    backend_service: str
    inner_type: Any
    missing: str


def _forwards() -> list[_Forward]:
    t, m = tei_pb2, mux_pb2
    uu, ss, su = Cardinality.UNARY_UNARY, Cardinality.STREAM_STREAM, Cardinality.STREAM_UNARY
    rows = [
        ("Embed", uu, m.EmbedRequest, t.EmbedResponse, "tei.v1.Embed", t.EmbedRequest, "embed"),
        ("EmbedStream", ss, m.EmbedRequest, t.EmbedResponse, "tei.v1.Embed", t.EmbedRequest, ""),
        ("EmbedSparse", uu, m.EmbedSparseRequest, t.EmbedSparseResponse, "tei.v1.Embed",
         t.EmbedSparseRequest, "embed_sparse"),
        ("EmbedSparseStream", ss, m.EmbedSparseRequest, t.EmbedSparseResponse, "tei.v1.Embed",
         t.EmbedSparseRequest, ""),
        ("EmbedAll", uu, m.EmbedAllRequest, t.EmbedAllResponse, "tei.v1.Embed",
         t.EmbedAllRequest, "embed_all"),
        ("EmbedAllStream", ss, m.EmbedAllRequest, t.EmbedAllResponse, "tei.v1.Embed",
         t.EmbedAllRequest, ""),
        ("Predict", uu, m.PredictRequest, t.PredictResponse, "tei.v1.Predict",
         t.PredictRequest, "predict"),
        ("PredictPair", uu, m.PredictPairRequest, t.PredictResponse, "tei.v1.Predict",
         t.PredictPairRequest, "predict_pair"),
        ("PredictStream", ss, m.PredictRequest, t.PredictResponse, "tei.v1.Predict",
         t.PredictRequest, ""),
        ("PredictPairStream", ss, m.PredictPairRequest, t.PredictResponse, "tei.v1.Predict",
         t.PredictPairRequest, ""),
        ("Rerank", uu, m.RerankRequest, t.RerankResponse, "tei.v1.Rerank", t.RerankRequest,
         "rerank"),
        ("RerankStream", su, m.RerankStreamRequest, t.RerankResponse, "tei.v1.Rerank",
         t.RerankStreamRequest, ""),
        ("Tokenize", uu, m.EncodeRequest, t.EncodeResponse, "tei.v1.Tokenize", t.EncodeRequest,
         "tokenize"),
        ("TokenizeStream", ss, m.EncodeRequest, t.EncodeResponse, "tei.v1.Tokenize",
         t.EncodeRequest, ""),
        ("Decode", uu, m.DecodeRequest, t.DecodeResponse, "tei.v1.Tokenize", t.DecodeRequest,
         "decode"),
        ("DecodeStream", ss, m.DecodeRequest, t.DecodeResponse, "tei.v1.Tokenize",
         t.DecodeRequest, ""),
    ]  # fmt: skip
    return [
        _Forward(name, card, req, resp, svc, inner, f"Missing {kind} request")
        for name, card, req, resp, svc, inner, kind in rows
    ]


FORWARDED = tuple(f.method for f in _forwards())
"""Every RPC forwarded as is (all but Info, EmbedArrow and EmbedSparseArrow)."""


class RawHandler:
    """A handler that gets purerpc's server stream itself: ``raw(stream, event)``.

    `teisup.grpc.server.MultiplexerServer` calls `raw` instead of purerpc's
    wrappers, so a stream handler can run a nursery (read ahead while it
    answers) without yielding from inside one. It sends its responses; the
    server closes the call with OK when it returns.
    """

    def __init__(self, raw: Callable[[Any, Any], Awaitable[None]]) -> None:
        self.raw = raw

    async def __call__(self, arg: Any, request: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError("dispatched through .raw by MultiplexerServer")


class MultiplexerService:
    """The ``TeiMultiplexer`` service over an `InstanceSource` and a `BackendPool`.

    `service` is the `purerpc.Service` to add to a `MultiplexerServer`; `route`,
    `call` and `stream_all` are the data plane other front ends (the HTTP one
    in `teisup.api`) share with it, so every request obeys the same routing,
    backpressure and deadlines. Every request is reported to ``observer``.
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

    # -- the purerpc service ------------------------------------------------------

    @property
    def service(self) -> purerpc.Service:
        """``tei_multiplexer.v1.TeiMultiplexer`` with every RPC of the contract."""
        service = purerpc.Service(SERVICE_NAME)
        service.add_method(
            "Info",
            self._observed_unary("Info", self._info),
            RPCSignature(Cardinality.UNARY_UNARY, mux_pb2.InfoRequest, tei_pb2.InfoResponse),
            method_signature=_TWO_ARGS,
        )
        for forward in _forwards():
            handler: Any
            if forward.cardinality == Cardinality.UNARY_UNARY:
                handler = self._observed_unary(
                    forward.method, functools.partial(self._unary, forward)
                )
            else:
                handler = RawHandler(
                    self._observed_raw(forward.method, functools.partial(self._stream, forward))
                )
            service.add_method(
                forward.method,
                handler,
                RPCSignature(forward.cardinality, forward.request_type, forward.response_type),
                method_signature=_TWO_ARGS,
            )
        service.add_method(
            "EmbedArrow",
            self._observed_unary("EmbedArrow", self._embed_arrow),
            RPCSignature(
                Cardinality.UNARY_UNARY, mux_pb2.EmbedArrowRequest, mux_pb2.EmbedArrowResponse
            ),
            method_signature=_TWO_ARGS,
        )
        service.add_method(
            "EmbedSparseArrow",
            self._observed_unary("EmbedSparseArrow", self._embed_sparse_arrow),
            RPCSignature(
                Cardinality.UNARY_UNARY,
                mux_pb2.EmbedSparseArrowRequest,
                mux_pb2.EmbedSparseArrowResponse,
            ),
            method_signature=_TWO_ARGS,
        )
        return service

    def _observed_unary(self, method: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> RawHandler:
        # Raw, so that reading the request is inside the observed block too: a
        # message over the size limit is refused there, and counted.
        async def raw(stream: Any, event: Any) -> None:
            with observed(self.observer, "grpc", method):
                message = await stream.receive_message()
                if message is None or await stream.receive_message() is not None:
                    raise status_error(
                        StatusCode.INVALID_ARGUMENT, f"{method} takes exactly one request message"
                    )
                await stream.send_message(await fn(message, event))

        return RawHandler(raw)

    def _observed_raw(
        self, method: str, fn: Callable[[Any, Any], Awaitable[None]]
    ) -> Callable[[Any, Any], Awaitable[None]]:
        async def raw(stream: Any, event: Any) -> None:
            with observed(self.observer, "grpc", method):
                await fn(stream, event)

        return raw

    # -- routing --------------------------------------------------------------------

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
        except purerpc.RpcFailedError as exc:
            by_model = target is not None and target.WhichOneof("routing") == "model_id"
            if not by_model or exc.status.status_code != StatusCode.UNAVAILABLE:
                raise
            try:
                other = self.route(target, exclude=frozenset({record.name}))
            except purerpc.RpcFailedError:
                raise exc from None
            return await self.call(other, fn, timeout=timeout)

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
                open_stream(channel, service, method, request_type, response_type) as backend,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_send_all, backend, requests)
                while (answer := await backend.receive()) is not None:
                    answers.append(answer)

        if requests:
            await self.call(record, call, timeout=self.unary_timeout())
        _check_rows(len(answers), len(requests))
        return answers

    def unary_timeout(self) -> float | None:
        """The pool deadline for a unary call: none under a client deadline, else the default."""
        # A client deadline is already the handler's (the server enforces it);
        # only calls without one get the default.
        if not math.isinf(trio.current_effective_deadline()):
            return None
        return self.default_timeout or None

    # -- handlers -------------------------------------------------------------------

    async def _info(self, message: mux_pb2.InfoRequest, request: Any) -> tei_pb2.InfoResponse:
        target = message.target if message.HasField("target") else None

        async def call(channel: Channel) -> Any:
            return await unary(
                channel, "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse
            )

        response: tei_pb2.InfoResponse = await self.call_target(
            target, call, timeout=self.unary_timeout()
        )
        return response

    async def _unary(self, forward: _Forward, message: Any, request: Any) -> Any:
        target = message.target if message.HasField("target") else None
        record = self.route(target)  # routing errors come first, as in tei-manager
        if not message.HasField("request"):
            raise status_error(StatusCode.INVALID_ARGUMENT, forward.missing)
        inner = message.request

        async def call(channel: Channel) -> Any:
            return await unary(
                channel, forward.backend_service, forward.method, inner, forward.response_type
            )

        return await self.call_target(target, call, timeout=self.unary_timeout(), routed=record)

    async def _stream(self, forward: _Forward, stream: Any, event: Any) -> None:
        first = await stream.receive_message()
        if first is None:
            raise status_error(StatusCode.INVALID_ARGUMENT, "Empty stream")
        record = self.route(first.target if first.HasField("target") else None)
        idle_timeout = self.stream_idle_timeout or math.inf
        client_stream = forward.cardinality == Cardinality.STREAM_UNARY

        async def call(channel: Channel) -> None:
            async with open_stream(
                channel,
                forward.backend_service,
                forward.method,
                forward.inner_type,
                forward.response_type,
            ) as backend:
                with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:

                    def moved() -> None:
                        idle.deadline = trio.current_time() + idle_timeout

                    async def pump_requests() -> None:
                        message = first
                        while message is not None:
                            if message.HasField("request"):
                                await backend.send(message.request)
                                moved()
                            message = await stream.receive_message()
                        await backend.done_sending()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pump_requests)
                        if client_stream:
                            answer = await backend.receive()
                            if answer is None or await backend.receive() is not None:
                                raise status_error(
                                    StatusCode.INTERNAL,
                                    f"{forward.method}: the backend did not answer once",
                                )
                            await stream.send_message(answer)
                        else:
                            while (answer := await backend.receive()) is not None:
                                await stream.send_message(answer)
                                moved()
                        # The backend has finished: whatever the client still
                        # sends has nowhere to go.
                        nursery.cancel_scope.cancel()
                if idle.cancelled_caught:
                    raise status_error(
                        StatusCode.DEADLINE_EXCEEDED,
                        f"Stream idle for {idle_timeout:g} s (no request or response)",
                    )

        await self.call(record, call, timeout=None)

    async def _embed_arrow(
        self, message: mux_pb2.EmbedArrowRequest, request: Any
    ) -> mux_pb2.EmbedArrowResponse:
        target, texts = self._arrow_input(message)
        if message.noop:
            return mux_pb2.EmbedArrowResponse(arrow_ipc=arrow.noop_dense(len(texts)))
        record = self.route(target)
        builder = arrow.DenseBuilder()
        requests = [
            tei_pb2.EmbedRequest(inputs=t, truncate=message.truncate, normalize=message.normalize)
            for t in texts
        ]

        async def call(channel: Channel) -> None:
            async with (
                open_stream(
                    channel,
                    "tei.v1.Embed",
                    "EmbedStream",
                    tei_pb2.EmbedRequest,
                    tei_pb2.EmbedResponse,
                ) as backend,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_send_all, backend, requests)
                while (answer := await backend.receive()) is not None:
                    try:
                        builder.add(answer.embeddings)
                    except ValueError as exc:
                        raise status_error(StatusCode.INTERNAL, str(exc)) from None

        await self.call(record, call, timeout=self.unary_timeout())
        _check_rows(builder.rows, len(texts))
        return mux_pb2.EmbedArrowResponse(arrow_ipc=builder.to_ipc())

    async def _embed_sparse_arrow(
        self, message: mux_pb2.EmbedSparseArrowRequest, request: Any
    ) -> mux_pb2.EmbedSparseArrowResponse:
        target, texts = self._arrow_input(message)
        if message.noop:
            return mux_pb2.EmbedSparseArrowResponse(arrow_ipc=arrow.noop_sparse(len(texts)))
        record = self.route(target)
        builder = arrow.SparseBuilder()
        requests = [tei_pb2.EmbedSparseRequest(inputs=t, truncate=message.truncate) for t in texts]

        async def call(channel: Channel) -> None:
            async with (
                open_stream(
                    channel,
                    "tei.v1.Embed",
                    "EmbedSparseStream",
                    tei_pb2.EmbedSparseRequest,
                    tei_pb2.EmbedSparseResponse,
                ) as backend,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_send_all, backend, requests)
                while (answer := await backend.receive()) is not None:
                    builder.add((v.index, v.value) for v in answer.sparse_embeddings)

        await self.call(record, call, timeout=self.unary_timeout())
        _check_rows(builder.rows, len(texts))
        return mux_pb2.EmbedSparseArrowResponse(arrow_ipc=builder.to_ipc())

    @staticmethod
    def _arrow_input(message: Any) -> tuple[mux_pb2.Target, list[str]]:
        try:
            target = validate_target(message.target if message.HasField("target") else None)
        except RoutingError as exc:
            raise status_error(exc.code, exc.message) from None
        try:
            texts = arrow.read_texts(message.arrow_ipc)
        except arrow.ArrowInputError as exc:
            raise status_error(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        current = current_request()
        if current is not None:
            current.rows = len(texts)
        return target, texts


async def _send_all(backend: BackendStream, requests: Sequence[Any]) -> None:
    for message in requests:
        await backend.send(message)
    await backend.done_sending()


def _check_rows(got: int, wanted: int) -> None:
    # Output row i must be input row i's embedding; a short answer is a bug upstream.
    if got != wanted:
        raise status_error(
            StatusCode.INTERNAL, f"the backend answered {got} rows for {wanted} texts"
        )


_TWO_ARGS = inspect.Signature(
    [
        inspect.Parameter("arg", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
)
