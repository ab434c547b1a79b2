"""teisup's gRPC plumbing, on purerpc 0.8.0 with its reliability gaps closed.

* `Server`: binds one host without SO_REUSEPORT (a taken port fails with
  EADDRINUSE), closes its listener and connections when cancelled, enforces
  client deadlines; ``await nursery.start(server.serve_async)`` gives the port.
* `open_channel`, `call_with_deadline`, `call_once`: client channels that
  always close their socket, and calls that end by their deadline with
  `RpcUnavailable` instead of hanging; `RpcStatusError` carries a server's
  error status.
* `HealthServicer`, `check_health`, `fetch_info`: ``grpc.health.v1`` served
  from a status table, and the two probes teisup runs against a TEI instance.

The generated messages and stubs are in `teisup.proto`.
"""

from ._purerpc import DEFAULT_MAX_MESSAGE_LENGTH, MAX_MESSAGE_LENGTH_LIMIT
from .client import (
    Channel,
    RpcError,
    RpcStatusError,
    RpcUnavailable,
    call_once,
    call_with_deadline,
    open_channel,
)
from .health import HealthServicer, ServingStatus, check_health, fetch_info
from .reflection import ReflectionService, ReflectionServiceV1
from .server import DEFAULT_HOST, Authorizer, Peer, Server

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "MAX_MESSAGE_LENGTH_LIMIT",
    "Authorizer",
    "Peer",
    "Channel",
    "HealthServicer",
    "ReflectionService",
    "ReflectionServiceV1",
    "RpcError",
    "RpcStatusError",
    "RpcUnavailable",
    "Server",
    "ServingStatus",
    "call_once",
    "call_with_deadline",
    "check_health",
    "fetch_info",
    "open_channel",
]
