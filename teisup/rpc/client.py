"""gRPC client plumbing on purerpc: channels that close, calls that cannot hang.

purerpc's client has two traps. A connection that dies mid-call is treated as
a clean end of stream, so the pending call waits forever; and the socket is
never closed, only dropped. Here:

* `open_channel` connects, yields a `Channel` and closes the socket on the way
  out, whatever happened; a connection the server closes fails the block at
  once instead of leaving calls waiting;
* `Channel.unary` and `Channel.stream` are the calls: the caller's deadline
  (and ``timeout``, if given) goes to the server as ``grpc-timeout``, an error
  status raises `RpcStatusError`, a broken transport `RpcUnavailable`, and a
  call left unfinished is reset (RST_STREAM CANCEL) so neither side keeps it;
  generated purerpc stubs accept a `Channel` too;
* `call_with_deadline` runs any call under `trio.fail_after` and turns every
  way of not getting an answer (refused, reset, broken HTTP/2, silence past
  the deadline) into `RpcUnavailable`;
* `call_once` does both for the common case: connect, one call, disconnect,
  all within one deadline.

Cancellation from outside always passes through untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.abc
import trio
from purerpc.grpclib.events import ResponseEnded

from ._purerpc import DEFAULT_MAX_MESSAGE_LENGTH, TidySocket, client_config, outbound_metadata
from .errors import RpcError, RpcStatusError, RpcUnavailable, describe, rpc_failure
from .status import StatusCode

__all__ = [
    "Channel",
    "ClientStream",
    "call_once",
    "call_with_deadline",
    "open_channel",
]

T = TypeVar("T")

Metadata = Sequence[tuple[str, str]]


class Channel:
    """An open connection to one gRPC server: `unary` and `stream` calls on it.

    Only `open_channel` makes these. Generated purerpc stubs accept one too;
    the attributes they read (``_host``, ``_port``, ``_grpc_socket``) are the
    contract with purerpc 0.8.0.
    """

    def __init__(self, host: str, port: int, grpc_socket: Any) -> None:
        self._host = host
        self._port = port
        self._grpc_socket = grpc_socket

    @property
    def target(self) -> str:
        """``host:port`` of the server."""
        return f"{self._host}:{self._port}"

    async def unary(
        self,
        service: str,
        method: str,
        request: Any,
        response_type: Any,
        *,
        metadata: Metadata | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the call's deadline, sent as grpc-timeout
    ) -> Any:
        """Call ``service/method`` with ``request``; return the response.

        The deadline is the caller's (its effective Trio deadline), shortened
        to ``timeout`` seconds when given; past ``timeout`` the call raises
        `RpcUnavailable`. Raises `RpcStatusError` for an error status and
        `RpcUnavailable` when the transport fails.
        """
        if timeout is not None:
            return await call_with_deadline(
                lambda: self.unary(service, method, request, response_type, metadata=metadata),
                timeout=timeout,
                target=self.target,
            )
        try:
            # The request's headers, message and end of stream leave in one write.
            with self._grpc_socket._socket.corked():
                stream = await self._start(service, method, type(request), response_type, metadata)
                try:
                    await stream.send_message(request)
                    await stream.close()
                except BaseException:
                    if stream.end_stream_event is None:
                        await _abandon(stream)
                    raise
            try:
                message = await stream.receive_message()
                if message is None:
                    _raise_end(stream)
                # Drain to the trailers: a call is only OK once the status says so.
                if await stream.receive_message() is not None:
                    raise RpcStatusError(StatusCode.INTERNAL, f"{service}/{method} answered twice")
                _raise_end(stream, ok_returns=True)
                return message
            finally:
                if stream.end_stream_event is None:
                    await _abandon(stream)
        except BaseException as exc:
            _reraise(exc, self.target)

    @asynccontextmanager
    async def stream(
        self,
        service: str,
        method: str,
        request_type: Any,
        response_type: Any,
        *,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[ClientStream]:
        """A streaming call ``service/method``; reset if the block leaves it unfinished.

        The deadline is the caller's, as for `unary`. Errors as for `unary`,
        from the stream's methods.
        """
        try:
            stream = await self._start(service, method, request_type, response_type, metadata)
        except BaseException as exc:
            _reraise(exc, self.target)
        try:
            yield ClientStream(stream, self.target)
        finally:
            if stream.end_stream_event is None:
                await _abandon(stream)

    async def _start(
        self,
        service: str,
        method: str,
        request_type: Any,
        response_type: Any,
        metadata: Metadata | None,
    ) -> Any:
        stream = await self._grpc_socket.start_request(
            "http",
            service,
            method,
            request_type.DESCRIPTOR.full_name,
            self.target,
            timeout=_timeout_header(),
            custom_metadata=outbound_metadata(metadata) if metadata else (),
        )
        stream.expect_message_type(response_type)
        return stream


class ClientStream:
    """A streaming call in progress: `send`, `done_sending`, `receive`."""

    __slots__ = ("_sending", "_stream", "_target")

    def __init__(self, stream: Any, target: str) -> None:
        self._stream = stream
        self._target = target
        self._sending = True

    async def send(self, message: Any) -> None:
        """Send one request message."""
        try:
            await self._stream.send_message(message)
        except BaseException as exc:
            _reraise(exc, self._target)

    async def done_sending(self) -> None:
        """Half-close: no more requests (again: nothing)."""
        if self._sending:
            self._sending = False
            try:
                await self._stream.close()
            except BaseException as exc:
                _reraise(exc, self._target)

    async def receive(self) -> Any | None:
        """The next response, or None at a successful end; an error status raises."""
        try:
            message = await self._stream.receive_message()
            if message is None:
                _raise_end(self._stream, ok_returns=True)
            return message
        except BaseException as exc:
            _reraise(exc, self._target)


def _reraise(exc: BaseException, target: str) -> NoReturn:
    """Raise the `RpcError` that ``exc`` (being handled) amounts to, else ``exc`` itself."""
    failure = rpc_failure(exc, target)
    if failure is None or failure is exc:
        raise exc
    raise failure from None


def _timeout_header() -> datetime.timedelta | None:
    # The caller's deadline is the current effective deadline; the server
    # gets what is left of it.
    remaining = trio.current_effective_deadline() - trio.current_time()
    if math.isinf(remaining):
        return None
    return datetime.timedelta(seconds=max(remaining, 0.001))


def _raise_end(stream: Any, *, ok_returns: bool = False) -> None:
    event = stream.end_stream_event
    if isinstance(event, ResponseEnded):
        status = event.status
        if status.int_value != StatusCode.OK:
            raise RpcStatusError(status.int_value, status.status_message)
        if ok_returns:
            return
        raise RpcStatusError(StatusCode.INTERNAL, "the server answered OK without a message")
    raise RpcStatusError(StatusCode.UNAVAILABLE, "the server ended the call without a status")


async def _abandon(stream: Any) -> None:
    """Reset a stream we stop caring about, so neither side keeps it."""
    with contextlib.suppress(Exception):
        stream.abandon()
        # Shielded and brief: we may be here because of a cancellation, and
        # a dead socket must not hold us.
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await stream._socket.flush()


@asynccontextmanager
async def open_channel(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
) -> AsyncIterator[Channel]:
    """Connect to ``host:port`` and yield a `Channel`; the socket is closed on exit.

    Raises `RpcUnavailable` if the connection cannot be made, or when it breaks
    while the block runs (the block is cancelled first). A server that stops
    answering without closing the connection is only caught by a deadline:
    the caller's, a call's ``timeout``, or `call_with_deadline`.
    """
    target = f"{host}:{port}"
    stream: anyio.abc.ByteStream
    try:
        if ssl_context is None:
            stream = await anyio.connect_tcp(host, port)
        else:
            # gRPC peers do not send TLS close_notify before closing.
            stream = await anyio.connect_tcp(
                host, port, ssl_context=ssl_context, tls_standard_compatible=False
            )
    except OSError as exc:
        raise RpcUnavailable(f"cannot connect to {target}: {describe(exc)}") from exc
    block_done = False
    try:
        async with TidySocket(client_config(max_message_length), stream) as grpc_socket:
            yield Channel(host, port, grpc_socket)
            block_done = True
    except BaseExceptionGroup as group:
        # The connection's own tasks failed (the server went away, or spoke
        # something other than gRPC), which cancels the block; say so plainly.
        translated = rpc_failure(group, target)
        if translated is None:
            raise
        if block_done:
            # It broke after the block had finished with it (a server closing
            # right after its last answer): nothing the caller has is lost.
            return
        raise translated from group
    finally:
        # Forcefully: this must not wait, even when we are leaving because a
        # deadline passed, and purerpc itself never closes the socket.
        await anyio.aclose_forcefully(stream)


async def call_with_deadline(
    call: Callable[[], Awaitable[T]],
    *,
    timeout: float,  # noqa: ASYNC109 - the deadline is part of the contract: it ends as RpcUnavailable
    target: str = "gRPC server",
) -> T:
    """Await ``call()`` for at most ``timeout`` seconds; return its result.

    Raises `RpcUnavailable` when the deadline passes or the transport fails,
    and `RpcStatusError` when the server answers with an error status. Other
    exceptions, and cancellation from outside, propagate unchanged. ``target``
    only names the server in error messages.
    """
    try:
        with trio.fail_after(timeout):
            return await call()
    except trio.TooSlowError:
        raise RpcUnavailable(f"{target}: no answer within {timeout:g} s") from None
    except RpcError:
        raise
    except BaseException as exc:
        translated = rpc_failure(exc, target)
        if translated is None:
            raise
        raise translated from exc


async def call_once(
    host: str,
    port: int,
    call: Callable[[Channel], Awaitable[T]],
    *,
    timeout: float,  # noqa: ASYNC109 - see call_with_deadline
    ssl_context: ssl.SSLContext | None = None,
) -> T:
    """Connect to ``host:port``, run ``call(channel)``, disconnect: all within ``timeout`` s.

    The deadline covers connecting too, so an address that swallows SYNs
    cannot stall it. Errors as for `call_with_deadline`.
    """

    async def attempt() -> T:
        async with open_channel(host, port, ssl_context=ssl_context) as channel:
            return await call(channel)

    return await call_with_deadline(attempt, timeout=timeout, target=f"{host}:{port}")
