"""What the data plane reports about each request, for metrics.

Every request through the multiplexer (gRPC or the HTTP data plane) runs
inside `observed`, which times it and, at its end, hands a `RequestRecord` to
the `RequestObserver` (teisup's Prometheus metrics, or nothing). The code that
routes the request fills in the instance and, for Arrow batches, the row
count, through `current_request` — a context variable, since routing happens
deep inside the call but in the same task.
"""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from teisup.rpc import first_status

__all__ = [
    "Observed",
    "RequestObserver",
    "RequestRecord",
    "current_request",
    "observed",
]


@dataclass(slots=True)
class RequestRecord:
    """One finished request: how it came, what it asked, where it went, how it ended.

    ``code`` is the gRPC status name (``OK``, ``NOT_FOUND``...) for both
    transports, so one dashboard reads them together; ``instance`` is ``""``
    when the request was refused before it was routed.
    """

    transport: str
    method: str
    instance: str = ""
    code: str = "OK"
    seconds: float = 0.0
    rows: int | None = None


class RequestObserver(Protocol):
    """Receives every finished request (`teisup.service.metrics.Metrics` is one)."""

    def request_done(self, record: RequestRecord) -> None: ...


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "teisup_request", default=None
)


def current_request() -> RequestRecord | None:
    """The record of the request this task is serving, if it is observed."""
    return _current.get()


def observed(observer: RequestObserver | None, transport: str, method: str) -> Observed:
    """Time the block as one request and report it to ``observer`` when it ends.

    The code is the status a `teisup.rpc.RpcStatusError` carries (in a group
    too), ``DEADLINE_EXCEEDED`` when the block is cancelled at its deadline,
    ``CANCELLED`` when cancelled otherwise (the client went away), and
    ``UNKNOWN`` for any other error. A
    caller that knows better (the HTTP layer mapping an error) may set
    ``record.code`` itself before leaving the block.
    """
    return Observed(observer, RequestRecord(transport, method))


class Observed:
    """`observed`'s block; entering it gives the `RequestRecord`.

    A class rather than a generator context manager: it runs on every request.
    """

    __slots__ = ("_began", "_deadline", "_observer", "_token", "record")

    def __init__(self, observer: RequestObserver | None, record: RequestRecord) -> None:
        self._observer = observer
        self.record = record

    def __enter__(self) -> RequestRecord:
        self._token = _current.set(self.record)
        self._began = time.perf_counter()
        # Read now: once cancelled, the effective deadline is -inf.
        self._deadline = trio.current_effective_deadline()
        return self.record

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        record = self.record
        try:
            if exc is not None:
                record.code = self._code(exc)
        finally:
            _current.reset(self._token)
            record.seconds = time.perf_counter() - self._began
            if self._observer is not None:
                self._observer.request_done(record)

    def _code(self, exc: BaseException) -> str:
        failed = first_status(exc)
        if failed is not None:
            return failed.code_name
        if isinstance(exc, trio.Cancelled) or (
            isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
        ):
            # Also a handler's nursery, cancelled.
            past = not math.isinf(self._deadline) and self._deadline <= trio.current_time()
            return "DEADLINE_EXCEEDED" if past else "CANCELLED"
        return "UNKNOWN"
