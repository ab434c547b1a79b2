"""A purerpc gRPC server that binds one host, refuses a taken port and cleans up.

purerpc's own `Server` binds every interface with SO_REUSEPORT (so a second
server on a taken port starts silently and the kernel splits traffic between
the two), never closes its listener or its connections, and swallows
cancellation in a bare ``except:``. `Server` here keeps purerpc's wire code and
its service/servicer objects and replaces the serving loop:

* it binds the given host only, without SO_REUSEPORT, so a taken port fails
  at start with ``OSError(EADDRINUSE)``;
* cancelling `Server.serve_async` closes the listener and every connection
  before it returns; a peer that hangs up cancels its in-flight calls;
* a handler that raises gives the caller UNKNOWN, a `purerpc.RpcFailedError`
  gives its own status, and cancellation is never caught;
* a client's ``grpc-timeout`` is enforced: the handler is cancelled and the
  call ends with DEADLINE_EXCEEDED; a client that cancels a call (RST_STREAM)
  cancels its handler at once;
* a message over ``max_message_length`` (either way) ends that call with
  RESOURCE_EXHAUSTED and leaves the connection and its other calls alone.

There is no graceful drain: stopping means cancelling, as with purerpc.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.streams.tls import TLSAttribute, TLSStream
from purerpc import Cardinality, RpcFailedError, Status, StatusCode
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
    server_config,
)

__all__ = ["DEFAULT_HOST", "Authorizer", "Peer", "Server"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Loopback: TEI instances and teisup's own servers are reached locally by default."""

_CALLERS: dict[Any, Callable[[Any, Any], Awaitable[None]]] = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}


@dataclass(frozen=True, slots=True)
class Peer:
    """The client at the other end of one connection.

    ``certificate`` is the client certificate the TLS handshake verified, in
    `ssl.SSLSocket.getpeercert` form, or None (plaintext, or no certificate
    sent under optional client authentication).
    """

    address: str
    certificate: dict[str, Any] | None = None


Authorizer = Callable[[Peer, RequestReceived], "Status | None"]
"""Decides one call before its handler runs: None lets it in, a status refuses it.

It gets the connection's `Peer` and the call's headers (``service_name``,
``method_name``, ``custom_metadata``)."""


class Server:
    """A gRPC server for purerpc services on one host and port.

    Add services (a generated ``...Servicer`` instance or a `purerpc.Service`)
    with `add_service`, then run it in a nursery::

        server = Server(port=0)
        server.add_service(MyServicer())
        port = await nursery.start(server.serve_async)

    ``port=0`` picks a free port; `serve_async` reports the bound one through
    ``task_status`` and `port` holds it from then on. With ``ssl_context`` the
    connections are TLS; set ALPN (``ctx.set_alpn_protocols(["h2"])``) on the
    context yourself if grpcio clients must connect. The context is read at
    each handshake, so loading a new certificate into it (or assigning
    `ssl_context`) applies to new connections and leaves open ones alone.
    ``authorize`` (an `Authorizer`) sees every call first.
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
        self._handshake_timeout = handshake_timeout
        self._services: dict[str, Any] = {}
        self._connections = 0

    @property
    def port(self) -> int:
        """The port asked for, or the bound one once `serve_async` has started."""
        return self._port

    @property
    def open_connections(self) -> int:
        """How many client connections are being served right now."""
        return self._connections

    def add_service(self, service: Any) -> None:
        """Serve ``service``: a `purerpc.Servicer` (a generated one) or a `purerpc.Service`.

        Raises ValueError if a service of the same name was already added.
        """
        resolved = service.service if hasattr(service, "service") else service
        if resolved.name in self._services:
            raise ValueError(f"service {resolved.name!r} is already served")
        self._services[resolved.name] = resolved

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
        # share a live port.
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self._port, reuse_port=False
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
        try:
            # Response headers wait for the first message (TidyStream), or the
            # call ends trailers-only: one write per answer, not two.
            event = await stream.receive_event()
            if not isinstance(event, RequestReceived):
                await stream.close(Status(StatusCode.INTERNAL, "expected request headers"))
                return
            service = self._services.get(event.service_name)
            method = service.methods.get(event.method_name) if service is not None else None
            if method is None:
                await stream.close(
                    Status(
                        StatusCode.UNIMPLEMENTED,
                        f"method {event.service_name}/{event.method_name} is not implemented",
                    )
                )
                return
            if self._authorize is not None:
                refusal = self._authorize(peer, event)
                if refusal is not None:
                    await stream.close(refusal)
                    return
            stream.expect_message_type(method.signature.request_type)
            handler = functools.partial(method.method_fn, request=event)
            caller = _CALLERS[method.signature.cardinality]
            deadline = event.timeout.total_seconds() if event.timeout is not None else None
            # A client that resets the stream (it cancelled the call) cancels
            # the handler, and whatever the handler was waiting for with it.
            with trio.CancelScope() as scope:
                stream.on_reset = scope.cancel
                if stream.reset is None:
                    await self._run_handler(caller, handler, stream, deadline)
        except Exception as exc:
            log.debug("gRPC call ended abnormally: %r", exc)

    @staticmethod
    async def _run_handler(
        caller: Callable[[Any, Any], Awaitable[None]],
        handler: Any,
        stream: Any,
        deadline: float | None,
    ) -> None:
        try:
            with trio.move_on_after(deadline if deadline is not None else float("inf")) as scope:
                await caller(handler, stream)
            if scope.cancelled_caught:
                await stream.close(Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
        except RpcFailedError as error:
            await stream.close(error.status)
        except MessageTooLargeError as exc:
            # An answer over the limit (a request over it is refused on arrival).
            await stream.close(Status(StatusCode.RESOURCE_EXHAUSTED, str(exc)))
        except Exception as exc:
            log.exception("gRPC handler failed")
            await stream.close(Status(StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"))


def _address(stream: anyio.abc.AnyByteStream) -> str:
    try:
        remote = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return ""
    if isinstance(remote, tuple):
        return f"{remote[0]}:{remote[1]}"
    return str(remote)
