"""gRPC client plumbing on purerpc: channels that close, calls that cannot hang.

purerpc's client has two traps. A connection that dies mid-call is treated as
a clean end of stream, so the pending call waits forever; and the socket is
never closed, only dropped. Here:

* `open_channel` connects, yields a `Channel` for generated purerpc stubs and
  closes the socket on the way out, whatever happened; a connection the server
  closes fails the block at once instead of leaving calls waiting;
* `call_with_deadline` runs one call under `trio.fail_after` and turns every
  way of not getting an answer (refused, reset, broken HTTP/2, silence past
  the deadline) into `RpcUnavailable`, and a non-OK gRPC status into
  `RpcStatusError`;
* `call_once` does both for the common case: connect, one call, disconnect,
  all within one deadline.

Cancellation from outside always passes through untouched.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
import h2.exceptions
import trio
from purerpc import GRPCError, RpcFailedError

from ._purerpc import DEFAULT_MAX_MESSAGE_LENGTH, TidySocket, client_config

__all__ = [
    "Channel",
    "RpcError",
    "RpcStatusError",
    "RpcUnavailable",
    "call_once",
    "call_with_deadline",
    "open_channel",
]

T = TypeVar("T")

# Everything that means "the transport failed", as opposed to "the server said no".
# OSError covers refused/reset connections, DNS failures and TLS errors (ssl.SSLError
# and anyio.ConnectionFailed are OSErrors); GRPCError covers purerpc's protocol
# and stream errors (RpcFailedError, a status answer, is sorted out first).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    h2.exceptions.H2Error,
    GRPCError,
)


class RpcError(Exception):
    """Base class of the errors a teisup gRPC call raises."""


class RpcUnavailable(RpcError):
    """No answer: the server could not be reached, broke the connection or stayed silent.

    ``reason`` says which, in words, including the target address.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RpcStatusError(RpcError):
    """The server answered the call with a non-OK gRPC status.

    ``code`` is the numeric status (e.g. 5 for NOT_FOUND), ``code_name`` its
    name, ``details`` the server's message.
    """

    def __init__(self, code: int, code_name: str, details: str) -> None:
        super().__init__(f"{code_name}: {details}" if details else code_name)
        self.code = code
        self.code_name = code_name
        self.details = details


class Channel:
    """An open connection to one gRPC server; pass it to generated purerpc stubs.

    Only `open_channel` makes these. The attributes purerpc's stubs read
    (``_host``, ``_port``, ``_grpc_socket``) are the contract with purerpc 0.8.0.
    """

    def __init__(self, host: str, port: int, grpc_socket: Any) -> None:
        self._host = host
        self._port = port
        self._grpc_socket = grpc_socket

    @property
    def target(self) -> str:
        """``host:port`` of the server."""
        return f"{self._host}:{self._port}"


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
    while the block runs (the block is cancelled first). Calls made on the
    channel have no deadline of their own: run them with `call_with_deadline`
    (or the whole block under `trio.fail_after`), since a server that stops
    answering without closing the connection is only caught by a deadline.
    Errors that calls raise in the block (purerpc's) propagate as they are.
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
        raise RpcUnavailable(f"cannot connect to {target}: {_describe(exc)}") from exc
    block_done = False
    try:
        async with TidySocket(client_config(max_message_length), stream) as grpc_socket:
            yield Channel(host, port, grpc_socket)
            block_done = True
    except BaseExceptionGroup as group:
        # The connection's own tasks failed (the server went away, or spoke
        # something other than gRPC), which cancels the block; say so plainly.
        translated = _translate(group, target)
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
        translated = _translate(exc, target)
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


def _translate(exc: BaseException, target: str) -> RpcError | None:
    """The `RpcError` that ``exc`` amounts to, or None if it is not an RPC failure."""
    if isinstance(exc, RpcFailedError):
        status = exc.status
        return RpcStatusError(status.int_value, status.status_code.name, status.status_message)
    if isinstance(exc, _TRANSPORT_ERRORS):
        return RpcUnavailable(f"{target}: connection failed: {_describe(exc)}")
    if isinstance(exc, BaseExceptionGroup):
        # purerpc's reader and writer tasks run in anyio task groups, whose
        # failures arrive grouped. Translate only if every leaf is an RPC
        # failure: anything else (Cancelled included) must stay visible.
        leaves = [_translate(leaf, target) for leaf in _leaves(exc)]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    # anyio chains the real cause ("All connection attempts failed" from a
    # refused connection); it is the part worth reading.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        cause = _leaves(cause)[0]
    if cause is not None:
        text += f" ({_describe(cause)})"
    return text
