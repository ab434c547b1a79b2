"""The errors a teisup gRPC call raises, and the one place that sorts failures into them.

A call either gets no answer (`RpcUnavailable`: refused, reset, broken HTTP/2,
silence past a deadline) or an error status (`RpcStatusError`). A server
handler raises `RpcStatusError` to answer with that status. `rpc_failure`
turns whatever purerpc, h2 or anyio raised (possibly grouped by a nursery)
into one of the two, and `first_status` finds the status a handler's nursery
let through.
"""

from __future__ import annotations

import anyio
import h2.exceptions
import purerpc
from purerpc.grpclib.exceptions import GRPCError, MessageTooLargeError

from .status import StatusCode

__all__ = [
    "RpcError",
    "RpcStatusError",
    "RpcUnavailable",
    "describe",
    "first_status",
    "rpc_failure",
    "status_error",
]

# Everything that means "the transport failed", as opposed to "the peer said no".
# OSError covers refused/reset connections, DNS failures and TLS errors (ssl.SSLError
# and anyio.ConnectionFailed are OSErrors); GRPCError covers purerpc's protocol
# and stream errors (a status answer, RpcFailedError, is sorted out first).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
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


class RpcStatusError(RpcError, purerpc.RpcFailedError):  # type: ignore[misc]  # purerpc is untyped
    """An error status: the server's answer to a call, or what a handler answers with.

    ``code`` is the `StatusCode` (an int: 5 for NOT_FOUND), ``code_name`` its
    name, ``details`` the message. Raised from a handler, it ends the call
    with that status.
    """

    def __init__(self, code: int, details: str = "") -> None:
        status_code = StatusCode.of(int(code))
        text = f"{status_code.name}: {details}" if details else status_code.name
        Exception.__init__(self, text)
        self.code = status_code
        self.code_name = status_code.name
        self.details = details
        # `RpcFailedError.status`, as purerpc sends it and reads it.
        self._status = purerpc.Status(purerpc.StatusCode(int(status_code)), details)


def status_error(code: StatusCode, message: str) -> RpcStatusError:
    """The exception that ends a call with ``code`` and ``message``."""
    return RpcStatusError(code, message)


def _from_purerpc(exc: purerpc.RpcFailedError) -> RpcStatusError:
    if isinstance(exc, RpcStatusError):
        return exc
    status = exc.status
    return RpcStatusError(status.int_value, status.status_message)


def rpc_failure(exc: BaseException, target: str) -> RpcError | None:
    """The `RpcError` that ``exc`` amounts to, or None if it is not an RPC failure.

    A group (a nursery's, or purerpc's reader and writer tasks') counts only
    when every leaf is an RPC failure, so that anything else (Cancelled
    included) stays visible; a status among the leaves wins, since it is the
    peer's own answer. ``target`` names the peer in `RpcUnavailable`'s reason.
    """
    if isinstance(exc, purerpc.RpcFailedError):
        return _from_purerpc(exc)
    if isinstance(exc, MessageTooLargeError):
        return RpcStatusError(StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, TRANSPORT_ERRORS):
        return RpcUnavailable(f"{target}: connection failed: {describe(exc)}")
    if isinstance(exc, BaseExceptionGroup):
        leaves = [rpc_failure(leaf, target) for leaf in exc.exceptions]
        if not leaves or any(leaf is None for leaf in leaves):
            return None
        statuses = [leaf for leaf in leaves if isinstance(leaf, RpcStatusError)]
        return statuses[0] if statuses else leaves[0]
    return None


def first_status(exc: BaseException) -> RpcStatusError | None:
    """The first error status in ``exc`` (itself, or depth first in a group), if any."""
    if isinstance(exc, purerpc.RpcFailedError):
        return _from_purerpc(exc)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_status(inner)
            if found is not None:
                return found
    return None


def describe(exc: BaseException) -> str:
    """``Type: message``, followed by the cause anyio chains (the part worth reading)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if cause is not None:
        text += f" ({describe(cause)})"
    return text
