"""The ``tei_multiplexer.v1`` gRPC multiplexer: one endpoint for every TEI instance.

* `Multiplexer` (`server.py`): the server, its backend pool, health and
  reflection; ``Multiplexer(manager, host=..., port=...).run`` is the
  supervised child, `serve_multiplexer` the plain Trio entry point;
* `routing` (pure): a `Target` to an instance, or the gRPC status refusing it;
* `pool`: one long-lived connection per instance, bounded in-flight calls,
  deadlines, UNAVAILABLE instead of hangs;
* `arrow` (pure): EmbedArrow / EmbedSparseArrow input and output;
* `service`: `MultiplexerService`, the data plane the gRPC and HTTP front
  ends share (routing, pool, deadlines, failover, observation);
* `handlers`: every RPC of ``tei_multiplexer.v1.TeiMultiplexer`` over it;
* `feed` (pure): the routing view and the messages between the manager and
  the multiplexer's worker processes (``grpc_workers``);
* `worker`: one worker process (``python -m teisup.grpc.worker``);
* `gate`: `GrpcGate`, the allow-list and token on every gRPC call.
"""

from .feed import (
    VIEW_VERSION,
    FeedError,
    FrameDecoder,
    Reload,
    RequestBatch,
    RoutingView,
    ViewInstance,
    ViewSource,
    WorkerFailed,
    WorkerReady,
    WorkerSetup,
    encode_message,
    routing_view,
    worker_share,
)
from .gate import GrpcGate
from .handlers import SERVICE_NAME
from .observe import RequestRecord
from .pool import BackendPool
from .routing import Replica, RoutingError, resolve
from .server import DEFAULT_PORT, Multiplexer, serve_multiplexer
from .service import InstanceRecord, InstanceSource, MultiplexerService

__all__ = [
    "DEFAULT_PORT",
    "SERVICE_NAME",
    "VIEW_VERSION",
    "BackendPool",
    "FeedError",
    "FrameDecoder",
    "GrpcGate",
    "InstanceRecord",
    "InstanceSource",
    "Multiplexer",
    "MultiplexerService",
    "Reload",
    "Replica",
    "RequestBatch",
    "RequestRecord",
    "RoutingError",
    "RoutingView",
    "ViewInstance",
    "ViewSource",
    "WorkerFailed",
    "WorkerReady",
    "WorkerSetup",
    "encode_message",
    "resolve",
    "routing_view",
    "serve_multiplexer",
    "worker_share",
]
