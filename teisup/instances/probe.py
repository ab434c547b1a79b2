"""The default readiness/liveness probe: ``grpc.health.v1.Health/Check``.

TEI's gRPC build answers the overall service ``""`` with SERVING from the
moment it listens, and nothing listens before the model is loaded and warmed
up, so an answer means ready. The probe has a hard deadline: a hung process
(SIGSTOP) makes it fail by timeout instead of hanging the prober.
"""

from __future__ import annotations

from ..rpc import RpcError, ServingStatus, check_health

__all__ = ["grpc_health_probe"]


async def grpc_health_probe(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109 - the probe's contract: a failed deadline is a failed probe
) -> str | None:
    """None when ``host:port`` answers SERVING, else why not."""
    try:
        status = await check_health(host, port, timeout=timeout)
    except RpcError as exc:
        return str(exc)
    if status is ServingStatus.SERVING:
        return None
    return f"health status {status.name}"
