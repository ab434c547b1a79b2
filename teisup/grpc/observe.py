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
from purerpc import RpcFailedError

__all__ = [
    "RequestObserver",
    "RequestRecord",
    "current_request",
    "first_status",
    "observed",
    "status_name",
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


def status_name(code: object) -> str:
    """``StatusCode.NOT_FOUND`` -> ``"NOT_FOUND"`` (purerpc's codes are an IntEnum)."""
    return getattr(code, "name", str(code))


@contextlib.contextmanager
def observed(
    observer: RequestObserver | None, transport: str, method: str
) -> Iterator[RequestRecord]:
    """Time the block as one request and report it to ``observer`` when it ends.

    The code is the status an `RpcFailedError` carries, ``DEADLINE_EXCEEDED``
    when the block is cancelled at its deadline, ``CANCELLED`` when cancelled
    otherwise (the client went away), and ``UNKNOWN`` for any other error. A
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
    except RpcFailedError as exc:
        record.code = status_name(exc.status.status_code)
        raise
    except BaseExceptionGroup as group:
        first = first_status(group)
        if first is not None:
            record.code = status_name(first.status.status_code)
        elif group.split(trio.Cancelled)[1] is None:
            record.code = cancelled()  # a handler's nursery, cancelled
        else:
            record.code = "UNKNOWN"
        raise
    except trio.Cancelled:
        record.code = cancelled()
        raise
    except BaseException:
        record.code = "UNKNOWN"
        raise
    finally:
        _current.reset(token)
        record.seconds = time.perf_counter() - began
        if observer is not None:
            observer.request_done(record)


def first_status(group: BaseExceptionGroup[BaseException]) -> RpcFailedError | None:
    """The first error status in ``group`` (depth first), if any: the call's answer."""
    for exc in group.exceptions:
        if isinstance(exc, RpcFailedError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_status(exc)
            if found is not None:
                return found
    return None
