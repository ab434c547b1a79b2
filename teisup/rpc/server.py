"""A gRPC server that binds one host, refuses a taken port, cleans up, and hands each call over.

purerpc's own `Server` binds every interface with SO_REUSEPORT (so a second
server on a taken port starts silently and the kernel splits traffic between
the two), never closes its listener or its connections, and swallows
cancellation in a bare ``except:``. `Server` here keeps purerpc's wire code and
replaces the serving loop:

* it binds the given host only, without SO_REUSEPORT, so a taken port fails
  at start with ``OSError(EADDRINUSE)``;
* cancelling `Server.serve_async` closes the listener and every connection
  before it returns; a peer that hangs up cancels its in-flight calls;
* a handler gets a `ServerCall` (receive, send, request metadata, peer,
  deadline, response headers); when it returns the call ends OK, an
  `RpcStatusError` (also from inside a handler's nursery) ends it with that
  status, any other exception with UNKNOWN; cancellation is never caught;
* a client's ``grpc-timeout`` is enforced: the handler is cancelled and the
  call ends with DEADLINE_EXCEEDED; a client that cancels a call (RST_STREAM)
  cancels its handler at once, and a call reset before it ran never runs;
* a message over ``max_message_length`` (either way) ends that call with
  RESOURCE_EXHAUSTED and leaves the connection and its other calls alone;
* ``authorize`` sees every call before its handler; `drain` refuses new calls
  (UNAVAILABLE) and waits for the ones in flight.

Services are `Service` tables of `Method` handlers; a generated servicer (or
a `purerpc.Service`) is adapted into one when it is added, once.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import purerpc
import trio
from anyio.streams.tls import TLSAttribute, TLSStream
from purerpc import Cardinality
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

from ._purerpc import (
    DEFAULT_MAX_MESSAGE_LENGTH,
    MAX_MESSAGE_LENGTH_LIMIT,
    TidySocket,
    outbound_metadata,
    server_config,
)
from .errors import RpcStatusError, first_status
from .status import Status, StatusCode

__all__ = [
    "DEFAULT_HOST",
    "Authorizer",
    "Handler",
    "Method",
    "Peer",
    "Server",
    "ServerCall",
    "Service",
    "current_call",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Loopback: TEI instances and teisup's own servers are reached locally by default."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The client at the other end of one connection.

    ``certificate`` is the client certificate the TLS handshake verified, in
    `ssl.SSLSocket.getpeercert` form, or None (plaintext, or no certificate
    sent under optional client authentication).
    """

    address: str
    certificate: dict[str, Any] | None = None


class ServerCall:
    """One call as its handler sees it: read requests, send responses.

    ``service`` and ``method`` name the call; `metadata` is the request's
    custom metadata (names lower-cased, values as text); ``peer`` the client;
    ``deadline`` the client's deadline in `trio.current_time` terms (None:
    none; the server enforces it). ``headers`` are the response's initial
    metadata: a handler may add to them until its first `send`, which carries
    them. A call that ends before any message is a trailers-only response.
    """

    __slots__ = (
        "_event",
        "_metadata",
        "_stream",
        "deadline",
        "headers",
        "method",
        "peer",
        "service",
    )

    def __init__(self, stream: Any, event: RequestReceived, peer: Peer) -> None:
        self._stream = stream
        self._event = event
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self.service: str = event.service_name
        self.method: str = event.method_name
        self.peer = peer
        self.deadline: float | None = (
            trio.current_time() + event.timeout.total_seconds()
            if event.timeout is not None
            else None
        )
        self.headers: list[tuple[str, str]] = []

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's custom metadata: ``(name, value)`` pairs, names lower-case."""
        if self._metadata is None:
            self._metadata = tuple(
                (str(k).lower(), v.decode() if isinstance(v, bytes) else str(v))
                for k, v in self._event.custom_metadata
            )
        return self._metadata

    async def receive(self) -> Any | None:
        """The next request message, or None once the client has finished sending."""
        return await self._stream.receive_message()

    async def receive_one(self) -> Any:
        """The one request message of a unary call; INVALID_ARGUMENT unless exactly one came."""
        message = await self._stream.receive_message()
        if message is None or await self._stream.receive_message() is not None:
            raise RpcStatusError(
                StatusCode.INVALID_ARGUMENT, f"{self.method} takes exactly one request message"
            )
        return message

    async def send(self, message: Any) -> None:
        """Send one response message; the first carries `headers`."""
        stream = self._stream
        if not stream._response_started and self.headers:
            await stream.start_response(custom_metadata=outbound_metadata(self.headers))
        await stream.send_message(message)

    async def answer(self, message: Any) -> None:
        """Send the one response of a unary call and end the call OK.

        Headers, message and trailers leave in one write.
        """
        with self._stream._socket.corked():
            await self.send(message)
            await self._stream.close(_OK)

    async def _close(self, status: Status) -> None:
        await self._stream.close(
            purerpc.Status(purerpc.StatusCode(int(status.code)), status.message)
        )


_OK = purerpc.Status(purerpc.StatusCode.OK, "")

Handler = Callable[[ServerCall], Awaitable[None]]
"""A method's implementation: it reads and sends through the `ServerCall`; returning ends
the call OK."""


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of a `Service`: its message types and its handler."""

    request_type: Any
    response_type: Any
    handler: Handler


@dataclass(frozen=True, slots=True)
class Service:
    """A gRPC service: its full name (``package.Service``) and its methods by name."""

    name: str
    methods: Mapping[str, Method]


Authorizer = Callable[[ServerCall], "Status | None"]
"""Decides one call before its handler runs: None lets it in, a `Status` refuses it."""

_CURRENT: contextvars.ContextVar[ServerCall] = contextvars.ContextVar("teisup_rpc_call")


def current_call() -> ServerCall:
    """The `ServerCall` the current task is handling (LookupError outside a handler)."""
    return _CURRENT.get()


_CALLERS: dict[Any, Callable[[Any, Any], Awaitable[None]]] = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}


def adapt(service: Any) -> Service:
    """``service`` as a `Service`: one already, or a generated servicer / `purerpc.Service`.

    A generated method keeps its shape (``Method(message)`` or
    ``Method(message, request)`` returning a response, or an async iterator
    for a response stream); it is wrapped here, once.
    """
    if isinstance(service, Service):
        return service
    resolved = service.service if hasattr(service, "service") else service
    methods = {}
    for name, bound in resolved.methods.items():
        signature = bound.signature
        methods[name] = Method(
            signature.request_type,
            signature.response_type,
            _generated(bound.method_fn, _CALLERS[signature.cardinality]),
        )
    return Service(resolved.name, methods)


def _generated(method_fn: Any, caller: Callable[[Any, Any], Awaitable[None]]) -> Handler:
    async def handler(call: ServerCall) -> None:
        await caller(functools.partial(method_fn, request=call._event), call._stream)

    return handler


class Server:
    """A gRPC server for `Service` tables (or generated servicers) on one host and port.

    Add services with `add_service`, then run it in a nursery::

        server = Server(port=0)
        server.add_service(MyServicer())
        port = await nursery.start(server.serve_async)

    ``port=0`` picks a free port; `serve_async` reports the bound one through
    ``task_status`` and `port` holds it from then on. With ``ssl_context`` the
    connections are TLS; set ALPN (``ctx.set_alpn_protocols(["h2"])``) on the
    context yourself if grpcio clients must connect. The context is read at
    each handshake, so loading a new certificate into it (or assigning
    `ssl_context`) applies to new connections and leaves open ones alone.
    ``authorize`` (an `Authorizer`) sees every call first. ``reuse_port``
    sets SO_REUSEPORT, for several processes serving one port (the kernel
    spreads the connections over them); without it a taken port fails.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = DEFAULT_HOST,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        authorize: Authorizer | None = None,
        reuse_port: bool = False,
    ) -> None:
        if not 0 < max_message_length <= MAX_MESSAGE_LENGTH_LIMIT:
            raise ValueError(
                f"max_message_length must be 1..{MAX_MESSAGE_LENGTH_LIMIT} bytes, "
                f"not {max_message_length}"
            )
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.max_message_length = max_message_length
        self._authorize = authorize
        self._reuse_port = reuse_port
        self._handshake_timeout = handshake_timeout
        self._services: dict[str, Service] = {}
        self._connections = 0
        self._in_flight = 0
        self._draining = False
        # Made by `drain` only, so a call costs no event of its own.
        self._drained: trio.Event | None = None

    @property
    def port(self) -> int:
        """The port asked for, or the bound one once `serve_async` has started."""
        return self._port

    @property
    def open_connections(self) -> int:
        """How many client connections are being served right now."""
        return self._connections

    @property
    def in_flight(self) -> int:
        """Calls being handled right now."""
        return self._in_flight

    @property
    def service_names(self) -> list[str]:
        """Every served service's full name, sorted."""
        return sorted(self._services)

    def add_service(self, service: Any) -> None:
        """Serve ``service``: a `Service`, a generated servicer or a `purerpc.Service`.

        Raises ValueError if a service of the same name was already added.
        """
        resolved = adapt(service)
        if resolved.name in self._services:
            raise ValueError(f"service {resolved.name!r} is already served")
        self._services[resolved.name] = resolved

    def add_services(self, services: Iterable[Any]) -> None:
        """`add_service` each of ``services``."""
        for service in services:
            self.add_service(service)

    async def drain(self) -> None:
        """Refuse new calls from now on (UNAVAILABLE) and wait until those in flight are done."""
        self._draining = True
        if self._in_flight:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def serve_async(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; report the bound port through ``task_status``.

        Raises OSError if the address cannot be bound (EADDRINUSE for a taken
        port), before ``task_status.started`` is called, so ``nursery.start``
        raises it too.
        """
        # anyio sets SO_REUSEADDR (rebinding over TIME_WAIT is fine) but, with
        # reuse_port=False, not SO_REUSEPORT, which would let a second server
        # share a live port. Only servers built to share one (the multiplexer's
        # worker processes, with ``reuse_port=True``) set it.
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self._port, reuse_port=self._reuse_port
        )
        async with listener:  # closes the listening socket(s) however we leave
            self._port = listener.extra(anyio.abc.SocketAttribute.local_port)
            log.debug("gRPC server listening on %s:%d", self.host, self._port)
            task_status.started(self._port)
            await listener.serve(self._serve_connection)

    async def _serve_connection(self, stream: anyio.abc.AnyByteStream) -> None:
        self._connections += 1
        try:
            address = _address(stream)
            certificate = None
            context = self.ssl_context
            if context is not None:
                with trio.fail_after(self._handshake_timeout):
                    stream = await TLSStream.wrap(
                        stream,
                        server_side=True,
                        ssl_context=context,
                        standard_compatible=False,
                    )
                certificate = stream.extra(TLSAttribute.peer_certificate, None) or None
            peer = Peer(address, certificate)
            async with (
                TidySocket(server_config(self.max_message_length), stream) as grpc_socket,
                trio.open_nursery() as calls,
            ):
                async for call in grpc_socket.listen():
                    calls.start_soon(self._dispatch, call, peer)
                # The peer closed the connection: nobody is left to read the
                # answers, and a call waiting on something else (a health Watch)
                # would otherwise keep this connection forever.
                calls.cancel_scope.cancel()
        except Exception as exc:
            # A broken or misbehaving peer ends its own connection, not the server.
            log.debug("gRPC connection ended: %r", exc)
        finally:
            self._connections -= 1
            await anyio.aclose_forcefully(stream)

    async def _dispatch(self, stream: Any, peer: Peer) -> None:
        self._in_flight += 1
        try:
            if stream.reset is None:  # not reset before this task ran
                await self._handle(stream, peer)
        except Exception as exc:
            # A reset while the request is read ends here too (CANCELLED).
            log.debug("gRPC call ended abnormally: %r", exc)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._drained is not None:
                self._drained.set()

    async def _handle(self, stream: Any, peer: Peer) -> None:
        # Response headers wait for the first message (TidyStream), or the
        # call ends trailers-only: one write per answer, not two.
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):
            await stream.close(
                purerpc.Status(purerpc.StatusCode.INTERNAL, "expected request headers")
            )
            return
        call = ServerCall(stream, event, peer)
        if self._draining:
            await call._close(Status(StatusCode.UNAVAILABLE, "server is shutting down"))
            return
        service = self._services.get(call.service)
        method = service.methods.get(call.method) if service is not None else None
        if method is None:
            await call._close(
                Status(
                    StatusCode.UNIMPLEMENTED,
                    f"method {call.service}/{call.method} is not implemented",
                )
            )
            return
        if self._authorize is not None:
            refusal = self._authorize(call)
            if refusal is not None:
                await call._close(refusal)
                return
        stream.expect_message_type(method.request_type)
        _CURRENT.set(call)  # this task's context only: each call runs in its own task
        await _run(method.handler, call)


async def _run(handler: Handler, call: ServerCall) -> None:
    """Run ``handler`` under the client's deadline; end the call with the status it earned."""
    stream = call._stream
    try:
        deadline = call.deadline if call.deadline is not None else math.inf
        # One scope for both ends of the call: the client's deadline, and a
        # client that resets the stream (it cancelled the call), which cancels
        # the handler and whatever it was waiting for with it.
        with trio.CancelScope(deadline=deadline) as scope:
            stream.on_reset = scope.cancel
            if stream.reset is None:  # not reset while the request was read
                await handler(call)
        if stream.reset is not None:
            return  # the client is gone: nothing to answer
        if scope.cancelled_caught:
            status = Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        else:
            status = Status(StatusCode.OK)
    except MessageTooLargeError as exc:
        # An answer over the limit (a request over it is refused on arrival).
        status = Status(StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except BaseException as exc:
        # A status, also one raised inside a handler's nursery (grouped).
        failed = first_status(exc)
        if failed is not None:
            await stream.close(failed.status)
            return
        if not isinstance(exc, Exception):
            raise  # cancellation (the connection is going) and the like
        log.exception("gRPC handler %s/%s failed", call.service, call.method)
        status = Status(StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
    if not stream.closed_locally:
        await call._close(status)


def _address(stream: anyio.abc.AnyByteStream) -> str:
    try:
        remote = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return ""
    if isinstance(remote, tuple):
        return f"{remote[0]}:{remote[1]}"
    return str(remote)
