"""The default probes: readiness/liveness and the served model.

`grpc_health_probe` calls ``grpc.health.v1.Health/Check``. TEI's gRPC build
answers the overall service ``""`` with SERVING from the moment it listens,
and nothing listens before the model is loaded and warmed up, so an answer
means ready. The probe has a hard deadline: a hung process (SIGSTOP) makes it
fail by timeout instead of hanging the prober.

`served_model_id` asks ``tei.v1.Info/Info`` which model the server on a port
serves: the identity check where the kernel's socket tables cannot be read
(`teisup.instances.identity`).
"""

from __future__ import annotations

from ..rpc import RpcError, ServingStatus, check_health, fetch_info

__all__ = ["grpc_health_probe", "served_model_id"]


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


async def served_model_id(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109 - the check's contract: no answer in time is "cannot tell"
) -> str | None:
    """The ``model_id`` the server on ``host:port`` reports, or None if it does not say.

    A server that requires an API key (TEI's ``--api-key``) or is no TEI at
    all does not say; that is not proof of a stranger.
    """
    try:
        info = await fetch_info(host, port, timeout=timeout)
    except RpcError:
        return None
    return info.model_id or None
