"""What the data plane reports about each request, for metrics.

Every request through the multiplexer (gRPC or the HTTP data plane) runs
inside `observed`, which times it and, at its end, hands a `RequestRecord` to
the `RequestObserver` (teisup's Prometheus metrics, or nothing). The code that
routes the request fills in the instance and, for Arrow batches, the row
count, through `current_request` — a context variable, since routing happens
deep inside the call but in the same task.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from teisup.rpc import first_status

__all__ = [
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


@contextlib.contextmanager
def observed(
    observer: RequestObserver | None, transport: str, method: str
) -> Iterator[RequestRecord]:
    """Time the block as one request and report it to ``observer`` when it ends.

    The code is the status a `teisup.rpc.RpcStatusError` carries (in a group
    too), ``DEADLINE_EXCEEDED`` when the block is cancelled at its deadline,
    ``CANCELLED`` when cancelled otherwise (the client went away), and
    ``UNKNOWN`` for any other error. A
    caller that knows better (the HTTP layer mapping an error) may set
    ``record.code`` itself before leaving the block.
    """
    record = RequestRecord(transport, method)
    token = _current.set(record)
    began = time.perf_counter()
    # Read now: once cancelled, the effective deadline is -inf.
    deadline = trio.current_effective_deadline()

    def cancelled() -> str:
        past = not math.isinf(deadline) and deadline <= trio.current_time()
        return "DEADLINE_EXCEEDED" if past else "CANCELLED"

    try:
        yield record
    except BaseException as exc:
        failed = first_status(exc)
        if failed is not None:
            record.code = failed.code_name
        elif isinstance(exc, trio.Cancelled) or (
            isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
        ):
            record.code = cancelled()  # also a handler's nursery, cancelled
        else:
            record.code = "UNKNOWN"
        raise
    finally:
        _current.reset(token)
        record.seconds = time.perf_counter() - began
        if observer is not None:
            observer.request_done(record)
