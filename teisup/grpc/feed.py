"""The routing view and the feed that carries it to the multiplexer's worker processes.

With ``grpc_workers`` > 1 the multiplexer runs in worker processes that know
nothing of the instance manager: the manager sends each of them a
`RoutingView` (every routable instance: name, model id, state, where it
listens, its in-flight limit) on every transition of the supervision tree,
and each worker routes by the latest view it holds. Messages are typed
msgspec Structs, tagged, in MessagePack, each framed by a 4-byte big-endian
length, over a pipe each way (`FrameDecoder`, `encode_message`):

* manager to worker: `WorkerSetup` once, then `RoutingView` (whole, never a
  diff, so a lost or reordered one cannot leave a worker wrong for longer
  than the next) and `Reload` (SIGHUP: load the TLS files again);
* worker to manager: `WorkerReady` once bound (or `WorkerFailed`), then
  `RequestBatch`, the requests it served, which the manager's metrics count as
  its own.

`VIEW_VERSION` versions the view, and a `ViewInstance` names its ``node``
(``""`` for this host) and ``host``, so instances of other nodes, and idle
ones that start on demand (a state of their own), can join it later; fields
added later come with defaults, and a reader skips fields it does not know.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ..security import TlsSettings
from ..supervision import ChildState
from .observe import RequestRecord

__all__ = [
    "VIEW_VERSION",
    "FeedError",
    "FrameDecoder",
    "Reload",
    "RequestBatch",
    "RoutingView",
    "ViewInstance",
    "ViewSource",
    "WorkerFailed",
    "WorkerReady",
    "WorkerSetup",
    "encode_message",
    "routing_view",
    "worker_share",
]

VIEW_VERSION = 1
"""The version of `RoutingView` this code writes and reads."""

_MAX_FRAME = 64 * 1024 * 1024


class FeedError(Exception):
    """A frame that cannot be read: too long, or not a message of the feed."""


class ViewInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One instance as a worker routes to it (it fits `teisup.grpc.InstanceRecord`)."""

    name: str
    model_id: str
    status: ChildState
    port: int
    #: The instance's own limit (``max_concurrent_requests``); each worker
    #: holds its `worker_share` of it.
    max_concurrent_requests: int
    host: str = "127.0.0.1"
    #: ``""``: this host. Reserved for instances other nodes serve.
    node: str = ""
    pid: int | None = None

    @property
    def spec(self) -> ViewInstance:
        """Itself: the pool reads ``record.spec.max_concurrent_requests``."""
        return self


class RoutingView(msgspec.Struct, frozen=True, kw_only=True, tag="view"):
    """Every routable instance, as of the manager's ``seq``-th delivery."""

    seq: int
    instances: tuple[ViewInstance, ...] = ()
    version: int = VIEW_VERSION


class WorkerSetup(msgspec.Struct, frozen=True, kw_only=True, tag="setup"):
    """What a worker needs to serve: the bind, limits, timeouts and access settings."""

    index: int
    workers: int
    host: str
    port: int
    max_message_length: int
    default_timeout: float
    stream_idle_timeout: float
    queue_timeout: float
    health_interval: float = 5.0
    tls: TlsSettings | None = None
    api_token: str | None = None


class Reload(msgspec.Struct, frozen=True, tag="reload"):
    """Load the TLS files again (the manager got SIGHUP)."""


class WorkerReady(msgspec.Struct, frozen=True, tag="ready"):
    """The worker is bound and serving on ``port``."""

    port: int
    pid: int


class WorkerFailed(msgspec.Struct, frozen=True, tag="failed"):
    """The worker could not start serving; ``errno`` is the OSError's when there is one."""

    message: str
    errno: int | None = None


class RequestBatch(msgspec.Struct, frozen=True, tag="requests"):
    """Requests a worker served (one `RequestRecord` as a tuple each, in order), and
    its calls in flight per instance as it sends the batch."""

    records: list[tuple[str, str, str, str, float, int | None]]
    in_flight: dict[str, int] = {}

    @classmethod
    def of(
        cls, records: Iterable[RequestRecord], in_flight: dict[str, int] | None = None
    ) -> RequestBatch:
        """The batch of ``records``."""
        return cls(
            [(r.transport, r.method, r.instance, r.code, r.seconds, r.rows) for r in records],
            in_flight or {},
        )

    def unpack(self) -> list[RequestRecord]:
        """The records again."""
        return [RequestRecord(*fields) for fields in self.records]


Message = WorkerSetup | RoutingView | Reload | WorkerReady | WorkerFailed | RequestBatch

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode_message(message: Message) -> bytes:
    """One framed message."""
    body = _encoder.encode(message)
    return len(body).to_bytes(4, "big") + body


class FrameDecoder:
    """Cuts a byte stream into messages: `feed` bytes, get the whole messages so far."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Message]:
        """The messages completed by ``data``; raises `FeedError` on a bad frame."""
        self._buffer += data
        messages: list[Message] = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= 4:
            size = int.from_bytes(buffer[at : at + 4], "big")
            if size > _MAX_FRAME:
                raise FeedError(f"a frame of {size} bytes is over the limit")
            if len(buffer) - at - 4 < size:
                break
            body = bytes(buffer[at + 4 : at + 4 + size])
            at += 4 + size
            try:
                messages.append(_decoder.decode(body))
            except msgspec.DecodeError as exc:
                raise FeedError(f"not a message of the feed: {exc}") from None
        del buffer[:at]
        return messages


def routing_view(records: Iterable[Any], seq: int) -> RoutingView:
    """The view of ``records`` (`teisup.instances.InstanceInfo` or alike)."""
    return RoutingView(
        seq=seq,
        instances=tuple(
            ViewInstance(
                name=r.name,
                model_id=r.model_id,
                status=r.status,
                port=r.port,
                max_concurrent_requests=r.spec.max_concurrent_requests,
                pid=r.pid,
            )
            for r in records
        ),
    )


def worker_share(limit: int, workers: int) -> int:
    """One worker's part of an instance's in-flight ``limit``: the limit split evenly.

    Rounded down, so the workers together never send the instance more than
    its limit; but at least 1, so a limit below the number of workers still
    lets each worker send one call.
    """
    return max(1, limit // max(1, workers))


class ViewSource:
    """The latest `RoutingView` as a `teisup.grpc.InstanceSource`.

    Each record's limit is this worker's `worker_share`. A view older than the
    one held (a smaller ``seq``) is ignored.
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.seq = -1
        self._records: list[ViewInstance] = []

    def all(self) -> Sequence[ViewInstance]:
        """The instances of the latest view."""
        return self._records

    def update(self, view: RoutingView) -> bool:
        """Take ``view``; False (and nothing changes) when it is older than the one held."""
        if view.seq < self.seq:
            return False
        self.seq = view.seq
        self._records = [
            msgspec.structs.replace(
                i, max_concurrent_requests=worker_share(i.max_concurrent_requests, self.workers)
            )
            for i in view.instances
        ]
        return True
