"""The ``tei_multiplexer.v1.TeiMultiplexer`` RPCs: every one forwarded to an instance.

`multiplexer_service` makes the `teisup.rpc.Service` from one table over a
`MultiplexerService` (the data plane). What each kind of RPC does:

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

Every stream, with a client deadline or not, also gets ``stream_idle_timeout``:
it ends with DEADLINE_EXCEEDED once no message has moved either way for that
long. Every RPC is observed (`MultiplexerService.observe`), reading its request
included, so a message over the size limit is counted too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from teisup.proto.tei.v1 import tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2
from teisup.rpc import Channel, Handler, Method, ServerCall, Service, StatusCode, status_error

from . import arrow
from .observe import current_request
from .routing import RoutingError, validate_target

if TYPE_CHECKING:
    from .service import MultiplexerService

__all__ = ["FORWARDED", "SERVICE_NAME", "multiplexer_service"]

SERVICE_NAME = "tei_multiplexer.v1.TeiMultiplexer"


class Shape(enum.Enum):
    """How a forwarded RPC's messages flow."""

    UNARY = "unary"
    STREAM = "stream"  # both ways, in order
    CLIENT_STREAM = "client_stream"  # many in, one out


@dataclass(frozen=True, slots=True)
class _Forward:
    """One forwarded RPC: the multiplexer's method and the backend's."""

    method: str
    shape: Shape
    request_type: Any
    response_type: Any
    backend_service: str
    missing: str


def _forwards() -> list[_Forward]:
    t, m = tei_pb2, mux_pb2
    u, s, cs = Shape.UNARY, Shape.STREAM, Shape.CLIENT_STREAM
    rows = [
        ("Embed", u, m.EmbedRequest, t.EmbedResponse, "tei.v1.Embed", "embed"),
        ("EmbedStream", s, m.EmbedRequest, t.EmbedResponse, "tei.v1.Embed", ""),
        ("EmbedSparse", u, m.EmbedSparseRequest, t.EmbedSparseResponse, "tei.v1.Embed",
         "embed_sparse"),
        ("EmbedSparseStream", s, m.EmbedSparseRequest, t.EmbedSparseResponse, "tei.v1.Embed", ""),
        ("EmbedAll", u, m.EmbedAllRequest, t.EmbedAllResponse, "tei.v1.Embed", "embed_all"),
        ("EmbedAllStream", s, m.EmbedAllRequest, t.EmbedAllResponse, "tei.v1.Embed", ""),
        ("Predict", u, m.PredictRequest, t.PredictResponse, "tei.v1.Predict", "predict"),
        ("PredictPair", u, m.PredictPairRequest, t.PredictResponse, "tei.v1.Predict",
         "predict_pair"),
        ("PredictStream", s, m.PredictRequest, t.PredictResponse, "tei.v1.Predict", ""),
        ("PredictPairStream", s, m.PredictPairRequest, t.PredictResponse, "tei.v1.Predict", ""),
        ("Rerank", u, m.RerankRequest, t.RerankResponse, "tei.v1.Rerank", "rerank"),
        ("RerankStream", cs, m.RerankStreamRequest, t.RerankResponse, "tei.v1.Rerank", ""),
        ("Tokenize", u, m.EncodeRequest, t.EncodeResponse, "tei.v1.Tokenize", "tokenize"),
        ("TokenizeStream", s, m.EncodeRequest, t.EncodeResponse, "tei.v1.Tokenize", ""),
        ("Decode", u, m.DecodeRequest, t.DecodeResponse, "tei.v1.Tokenize", "decode"),
        ("DecodeStream", s, m.DecodeRequest, t.DecodeResponse, "tei.v1.Tokenize", ""),
    ]  # fmt: skip
    return [
        _Forward(name, shape, req, resp, svc, f"Missing {kind} request")
        for name, shape, req, resp, svc, kind in rows
    ]


FORWARDS = tuple(_forwards())

FORWARDED = tuple(f.method for f in FORWARDS)
"""Every RPC forwarded as is (all but Info, EmbedArrow and EmbedSparseArrow)."""


@dataclass(frozen=True, slots=True)
class _Arrow:
    """One Arrow RPC: its messages, the backend stream it runs on, how rows are built."""

    method: str
    request_type: Any
    response_type: Any
    backend_method: str
    backend_request: Callable[[str, Any], Any]  # (text, the Arrow request) -> one backend request
    backend_response: Any
    builder: Callable[[], Any]
    add: Callable[[Any, Any], None]  # (builder, one backend answer)
    noop: Callable[[int], bytes]


ARROWS = (
    _Arrow(
        "EmbedArrow",
        mux_pb2.EmbedArrowRequest,
        mux_pb2.EmbedArrowResponse,
        "EmbedStream",
        lambda text, m: tei_pb2.EmbedRequest(
            inputs=text, truncate=m.truncate, normalize=m.normalize
        ),
        tei_pb2.EmbedResponse,
        arrow.DenseBuilder,
        lambda builder, answer: builder.add(answer.embeddings),
        arrow.noop_dense,
    ),
    _Arrow(
        "EmbedSparseArrow",
        mux_pb2.EmbedSparseArrowRequest,
        mux_pb2.EmbedSparseArrowResponse,
        "EmbedSparseStream",
        lambda text, m: tei_pb2.EmbedSparseRequest(inputs=text, truncate=m.truncate),
        tei_pb2.EmbedSparseResponse,
        arrow.SparseBuilder,
        lambda builder, answer: builder.add((v.index, v.value) for v in answer.sparse_embeddings),
        arrow.noop_sparse,
    ),
)


def multiplexer_service(data: MultiplexerService) -> Service:
    """``tei_multiplexer.v1.TeiMultiplexer``: every RPC of the contract, served by ``data``."""
    methods = {
        "Info": Method(
            mux_pb2.InfoRequest,
            tei_pb2.InfoResponse,
            _unary(data, "Info", lambda message: _info(data, message)),
        )
    }
    for forward in FORWARDS:
        if forward.shape is Shape.UNARY:
            handler = _unary(data, forward.method, _forward_one(data, forward))
        else:
            handler = _stream(data, forward)
        methods[forward.method] = Method(forward.request_type, forward.response_type, handler)
    for kind in ARROWS:
        methods[kind.method] = Method(
            kind.request_type, kind.response_type, _unary(data, kind.method, _arrow(data, kind))
        )
    return Service(SERVICE_NAME, methods)


def _unary(
    data: MultiplexerService, method: str, answer: Callable[[Any], Awaitable[Any]]
) -> Handler:
    async def handler(call: ServerCall) -> None:
        with data.observe("grpc", method):
            await call.answer(await answer(await call.receive_one()))

    return handler


def _target(message: Any) -> mux_pb2.Target | None:
    return message.target if message.HasField("target") else None


async def _info(data: MultiplexerService, message: mux_pb2.InfoRequest) -> Any:
    return await data.forward(
        _target(message), "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse
    )


def _forward_one(data: MultiplexerService, forward: _Forward) -> Callable[[Any], Awaitable[Any]]:
    async def answer(message: Any) -> Any:
        target = _target(message)
        record = data.route(target)  # routing errors come first, as in tei-manager
        if not message.HasField("request"):
            raise status_error(StatusCode.INVALID_ARGUMENT, forward.missing)
        return await data.forward(
            target,
            forward.backend_service,
            forward.method,
            message.request,
            forward.response_type,
            routed=record,
        )

    return answer


def _stream(data: MultiplexerService, forward: _Forward) -> Handler:
    async def handler(call: ServerCall) -> None:
        with data.observe("grpc", forward.method):
            await _pump(data, forward, call)

    return handler


async def _pump(data: MultiplexerService, forward: _Forward, call: ServerCall) -> None:
    first = await call.receive()
    if first is None:
        raise status_error(StatusCode.INVALID_ARGUMENT, "Empty stream")
    record = data.route(_target(first))
    idle_timeout = data.stream_idle_timeout or math.inf
    inner_type = type(first.request)

    async def run(channel: Channel) -> None:
        async with channel.stream(
            forward.backend_service, forward.method, inner_type, forward.response_type
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
                        message = await call.receive()
                    await backend.done_sending()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump_requests)
                    if forward.shape is Shape.CLIENT_STREAM:
                        answer = await backend.receive()
                        if answer is None or await backend.receive() is not None:
                            raise status_error(
                                StatusCode.INTERNAL,
                                f"{forward.method}: the backend did not answer once",
                            )
                        await call.send(answer)
                    else:
                        while (answer := await backend.receive()) is not None:
                            await call.send(answer)
                            moved()
                    # The backend has finished: whatever the client still
                    # sends has nowhere to go.
                    nursery.cancel_scope.cancel()
            if idle.cancelled_caught:
                raise status_error(
                    StatusCode.DEADLINE_EXCEEDED,
                    f"Stream idle for {idle_timeout:g} s (no request or response)",
                )

    await data.call(record, run, timeout=None)


def _arrow(data: MultiplexerService, kind: _Arrow) -> Callable[[Any], Awaitable[Any]]:
    async def answer(message: Any) -> Any:
        try:
            target = validate_target(_target(message))
        except RoutingError as exc:
            raise status_error(exc.code, exc.message) from None
        try:
            texts = arrow.read_texts(message.arrow_ipc)
        except arrow.ArrowInputError as exc:
            raise status_error(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        current = current_request()
        if current is not None:
            current.rows = len(texts)
        if message.noop:
            return kind.response_type(arrow_ipc=kind.noop(len(texts)))
        record = data.route(target)
        answers = await data.stream_all(
            record,
            "tei.v1.Embed",
            kind.backend_method,
            [kind.backend_request(text, message) for text in texts],
            kind.backend_response,
        )
        builder = kind.builder()
        try:
            for one in answers:
                kind.add(builder, one)
        except ValueError as exc:
            raise status_error(StatusCode.INTERNAL, str(exc)) from None
        return kind.response_type(arrow_ipc=builder.to_ipc())

    return answer
