"""teisup's one gRPC boundary, on purerpc 0.8.0 with its reliability gaps closed.

Nothing else in teisup imports purerpc, h2, hpack, hyperframe or anyio; the
rest of teisup speaks gRPC through this package's small call API:

* server side: `Server` (binds one host without SO_REUSEPORT, closes its
  sockets, enforces deadlines, refuses over-size messages per call; options:
  ``authorize``, `Server.drain`) serves `Service` tables whose `Method`
  handlers receive a `ServerCall` (receive, send, request metadata, peer,
  deadline, response headers); generated servicers are adapted when added;
* client side: `open_channel` yields a `Channel` with `Channel.unary` and
  `Channel.stream` calls that carry the caller's deadline; `call_with_deadline`
  and `call_once` bound any call so it never hangs;
* errors and statuses: `RpcStatusError` (an error status, either way),
  `RpcUnavailable` (no answer), `StatusCode` and `Status` (teisup's own types);
* `HealthServicer`, `check_health`, `fetch_info`: ``grpc.health.v1`` served
  from a status table, and the two probes teisup runs against a TEI instance;
  `ReflectionService` / `ReflectionServiceV1`: server reflection.

The generated messages and stubs are in `teisup.proto`.
"""

from ._purerpc import DEFAULT_MAX_MESSAGE_LENGTH, MAX_MESSAGE_LENGTH_LIMIT
from .client import Channel, ClientStream, call_once, call_with_deadline, open_channel
from .errors import (
    RpcError,
    RpcStatusError,
    RpcUnavailable,
    first_status,
    rpc_failure,
    status_error,
)
from .health import HealthServicer, ServingStatus, check_health, fetch_info
from .reflection import ReflectionService, ReflectionServiceV1
from .server import (
    DEFAULT_HOST,
    Authorizer,
    Handler,
    Method,
    Peer,
    Server,
    ServerCall,
    Service,
    current_call,
)
from .status import Status, StatusCode

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "MAX_MESSAGE_LENGTH_LIMIT",
    "Authorizer",
    "Channel",
    "ClientStream",
    "Handler",
    "HealthServicer",
    "Method",
    "Peer",
    "ReflectionService",
    "ReflectionServiceV1",
    "RpcError",
    "RpcStatusError",
    "RpcUnavailable",
    "Server",
    "ServerCall",
    "Service",
    "ServingStatus",
    "Status",
    "StatusCode",
    "call_once",
    "call_with_deadline",
    "check_health",
    "current_call",
    "fetch_info",
    "first_status",
    "open_channel",
    "rpc_failure",
    "status_error",
]
