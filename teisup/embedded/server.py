"""The gRPC server of the embedded backend: `teisup.rpc.Server` with TEI's call handling.

It differs from the shared server in what TEI's protocol needs:

* **Response headers.** A unary TEI call answers with initial metadata
  (``x-compute-time`` and friends) that is only known once the result is.
  So response headers are not sent up front: they go out with the first
  message, carrying whatever the handler put in `Call.headers` by then. An
  error before any message is a trailers-only response, as tonic sends.
* **Streams without generators.** A bidi handler here is
  ``async def Handler(requests) -> None`` that sends with `Call.send`, so it
  may run a nursery (reading ahead while answering in order) without yielding
  from inside one.
* **API key.** With ``api_key``, calls to the ``protected`` services need
  ``authorization: Bearer <key>`` or get UNAUTHENTICATED ``No valid auth token``.
* **Drain.** `drain` refuses new calls (UNAVAILABLE) and waits for the
  in-flight ones, for a SIGTERM that finishes what was started.

`current_call` gives a handler its `Call`: request metadata and response headers.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from purerpc import Cardinality, RpcFailedError, Status, StatusCode
from purerpc.grpclib.events import RequestReceived
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
    extract_message_from_singleton_stream,
    stream_to_async_iterator,
)

from teisup.rpc import Peer, Server

__all__ = ["Call", "EmbeddedServer", "current_call"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """One RPC in progress, as its handler sees it."""

    service: str
    method: str
    metadata: tuple[tuple[str, str], ...]
    """The request's custom metadata (lower-case names)."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    """Initial metadata for the response; read when the first message is sent."""
    _stream: Any = None
    _started: bool = False

    async def send(self, message: Any) -> None:
        """Send one response message (the headers go out with the first)."""
        if not self._started:
            self._started = True
            await self._stream.start_response(custom_metadata=tuple(self.headers))
        await self._stream.send_message(message)

    async def close(self, status: Status) -> None:
        # Success after messages ends with trailers; an error (or an empty
        # stream) before any message is trailers-only.
        await self._stream.close(status)


_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("teisup_embedded_call")


def current_call() -> Call:
    """The `Call` being handled by the current task (LookupError outside a handler)."""
    return _CALL.get()


class _Sender:
    """The stream as purerpc's wrappers see it, with sends going through the `Call`."""

    def __init__(self, call: Call, stream: Any) -> None:
        self._call = call
        self._stream = stream

    async def send_message(self, message: Any) -> None:
        await self._call.send(message)

    async def close(self, status: Status) -> None:
        await self._call.close(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class EmbeddedServer(Server):
    """`teisup.rpc.Server` with lazy response headers, API-key checks and drain."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str,
        api_key: str | None = None,
        protected: Iterable[str] = (),
    ) -> None:
        super().__init__(port, host=host)
        self._api_key = api_key
        self._protected = frozenset(protected)
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._draining = False

    @property
    def service_names(self) -> list[str]:
        """Every served service's full name."""
        return sorted(self._services)

    @property
    def in_flight(self) -> int:
        """Calls being handled right now."""
        return self._in_flight

    async def drain(self) -> None:
        """Refuse new calls from now on and wait until the in-flight ones are done."""
        self._draining = True
        await self._idle.wait()

    def _authorized(self, service: str, metadata: tuple[tuple[str, str], ...]) -> bool:
        if self._api_key is None or service not in self._protected:
            return True
        return ("authorization", f"Bearer {self._api_key}") in metadata

    async def _dispatch(self, stream: Any, peer: Peer) -> None:
        self._in_flight += 1
        self._idle = trio.Event() if self._in_flight == 1 else self._idle
        try:
            # A client that cancels the call (RST_STREAM: the multiplexer does,
            # for a call past its deadline) stops the work done for it.
            with trio.CancelScope() as scope:
                stream.on_reset = scope.cancel
                if stream.reset is None:  # not cancelled before this task ran
                    await self._handle(stream)
        except Exception as exc:
            log.debug("gRPC call ended abnormally: %r", exc)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, stream: Any) -> None:
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):
            await stream.close(Status(StatusCode.INTERNAL, "expected request headers"))
            return
        metadata = tuple(
            (str(k).lower(), v.decode() if isinstance(v, bytes) else str(v))
            for k, v in event.custom_metadata
        )
        call = Call(event.service_name, event.method_name, metadata, _stream=stream)
        if self._draining:
            await call.close(Status(StatusCode.UNAVAILABLE, "server is shutting down"))
            return
        service = self._services.get(event.service_name)
        method = service.methods.get(event.method_name) if service is not None else None
        if method is None:
            await call.close(
                Status(
                    StatusCode.UNIMPLEMENTED,
                    f"method {event.service_name}/{event.method_name} is not implemented",
                )
            )
            return
        if not self._authorized(event.service_name, metadata):
            await call.close(Status(StatusCode.UNAUTHENTICATED, "No valid auth token"))
            return
        stream.expect_message_type(method.signature.request_type)
        _CALL.set(call)  # this task's context only: each call runs in its own task
        deadline = event.timeout.total_seconds() if event.timeout is not None else None
        handler = method.method_fn
        cardinality = method.signature.cardinality
        sender = _Sender(call, stream)
        try:
            with trio.move_on_after(deadline if deadline is not None else float("inf")) as scope:
                await _invoke(cardinality, handler, event, sender, stream)
            if scope.cancelled_caught:
                await call.close(Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
        except RpcFailedError as error:
            await call.close(error.status)
        except BaseExceptionGroup as group:
            # A handler's nursery let an error status through, wrapped: answer with it.
            failed = group.subgroup(lambda e: isinstance(e, RpcFailedError))
            if failed is None:
                raise
            first: BaseException = failed
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, RpcFailedError)
            await call.close(first.status)
        except Exception as exc:
            log.exception("gRPC handler %s/%s failed", call.service, call.method)
            await call.close(Status(StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"))


async def _invoke(
    cardinality: Any, handler: Any, event: RequestReceived, sender: _Sender, stream: Any
) -> None:
    if getattr(handler, "__teisup_sends__", False):
        # Our own handlers, called with the request (or the request iterator)
        # only; they send through current_call() and we close with OK.
        if cardinality in (Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM):
            await handler.raw(await extract_message_from_singleton_stream(stream))
        else:
            requests: AsyncIterator[Any] = stream_to_async_iterator(stream)
            await handler.raw(requests)
        await sender.close(Status(StatusCode.OK))
        return
    # Generated-style handlers (health, reflection): purerpc's own wrappers.
    callers = {
        Cardinality.UNARY_UNARY: call_server_unary_unary,
        Cardinality.UNARY_STREAM: call_server_unary_stream,
        Cardinality.STREAM_UNARY: call_server_stream_unary,
        Cardinality.STREAM_STREAM: call_server_stream_stream,
    }
    await callers[cardinality](lambda arg: handler(arg, request=event), sender)
