"""Health and readiness over gRPC: the ``grpc.health.v1`` service and the probes.

`HealthServicer` serves ``grpc.health.v1.Health`` (Check and Watch) from a
table of per-service statuses that its owner updates with `set_status`; TEI
itself, grpc_health_probe and Kubernetes gRPC probes all speak this protocol.
`check_health` and `fetch_info` are the two probes teisup runs against a TEI
instance: the health status of one service, and TEI's ``tei.v1.Info``.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType

import trio

from teisup.proto.grpc.health.v1 import health_grpc, health_pb2
from teisup.proto.tei.v1 import tei_pb2

from .client import Channel, call_once
from .errors import RpcStatusError
from .status import StatusCode

__all__ = ["HealthServicer", "ServingStatus", "check_health", "fetch_info"]


class ServingStatus(enum.IntEnum):
    """``grpc.health.v1.HealthCheckResponse.ServingStatus``, as a Python enum.

    Names and values are the protocol's, so ``status.name`` is also the label
    the generated message accepts.
    """

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3
    """Sent by Watch for a service the server does not know; `check_health`
    also returns it when Check answers NOT_FOUND."""


class HealthServicer(health_grpc.HealthServicer):
    """``grpc.health.v1.Health`` over a table of service name -> `ServingStatus`.

    The name ``""`` stands for the server as a whole. Check answers NOT_FOUND
    for a name not in the table; Watch sends SERVICE_UNKNOWN for it, then every
    change, as the protocol says. Update the table with `set_status` and
    `clear_status` (not by mutating a dict you passed in: watchers would not
    hear of it); the methods are synchronous and must be called from the Trio
    thread that runs the server.
    """

    def __init__(self, statuses: Mapping[str, ServingStatus] | None = None) -> None:
        self._statuses: dict[str, ServingStatus] = dict(statuses or {})
        # Replaced on every change; a watcher waits on the one current when it
        # last looked, so no change between its look and its wait is missed.
        self._changed = trio.Event()

    @property
    def statuses(self) -> Mapping[str, ServingStatus]:
        """A read-only live view of the table."""
        return MappingProxyType(self._statuses)

    def set_status(self, service: str, status: ServingStatus) -> None:
        """Set the status of ``service`` (adding it if new) and wake its watchers."""
        if self._statuses.get(service) != status:
            self._statuses[service] = status
            self._notify()

    def clear_status(self, service: str) -> None:
        """Forget ``service``: Check answers NOT_FOUND for it from now on."""
        if self._statuses.pop(service, None) is not None:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def Check(
        self, input_message: health_pb2.HealthCheckRequest
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(input_message.service)
        if status is None:
            raise RpcStatusError(StatusCode.NOT_FOUND, f"unknown service {input_message.service!r}")
        return health_pb2.HealthCheckResponse(status=status.name)

    async def Watch(
        self, input_message: health_pb2.HealthCheckRequest
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        sent: ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._statuses.get(input_message.service, ServingStatus.SERVICE_UNKNOWN)
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status.name)
                sent = status
            await changed.wait()


async def check_health(
    host: str,
    port: int,
    *,
    service: str = "",
    timeout: float,  # noqa: ASYNC109 - a probe's deadline, turned into RpcUnavailable
    ssl_context: ssl.SSLContext | None = None,
) -> ServingStatus:
    """Ask the server at ``host:port`` for the health of ``service`` (``""``: the server).

    Returns SERVICE_UNKNOWN when the server does not know ``service`` (Check
    answered NOT_FOUND), and UNKNOWN for a status value this enum lacks.
    Raises `RpcUnavailable` if there is no answer within ``timeout`` seconds,
    connecting included, and `RpcStatusError` for any other error status
    (e.g. UNIMPLEMENTED from a server without a health service).
    """

    async def check(channel: Channel) -> ServingStatus:
        response = await channel.unary(
            "grpc.health.v1.Health",
            "Check",
            health_pb2.HealthCheckRequest(service=service),
            health_pb2.HealthCheckResponse,
        )
        try:
            return ServingStatus(response.status)
        except ValueError:
            return ServingStatus.UNKNOWN

    try:
        return await call_once(host, port, check, timeout=timeout, ssl_context=ssl_context)
    except RpcStatusError as exc:
        if exc.code == StatusCode.NOT_FOUND:
            return ServingStatus.SERVICE_UNKNOWN
        raise


async def fetch_info(
    host: str,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109 - a probe's deadline, turned into RpcUnavailable
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tei_pb2.InfoResponse:
    """Call ``tei.v1.Info/Info`` on the TEI instance at ``host:port``.

    ``api_key`` is sent as ``authorization: Bearer <key>``, which TEI requires
    on its own services when started with ``--api-key`` (health needs none).
    Raises `RpcUnavailable` if there is no answer within ``timeout`` seconds and
    `RpcStatusError` on an error status (UNAUTHENTICATED for a wrong key).
    """
    metadata = [("authorization", f"Bearer {api_key}")] if api_key is not None else None

    async def info(channel: Channel) -> tei_pb2.InfoResponse:
        response: tei_pb2.InfoResponse = await channel.unary(
            "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse, metadata=metadata
        )
        return response

    return await call_once(host, port, info, timeout=timeout, ssl_context=ssl_context)
