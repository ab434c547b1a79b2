"""The parts of the service, each built from the configuration.

Pure construction, no I/O beyond what a constructor does (the TLS files are
read and checked by `tls_reloader`, before anything binds): the instance
manager and its port ranges, the data plane's backend pool and service, the
multiplexer, hypercorn's settings for the API.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from contextlib import AbstractContextManager

import hypercorn.config
import trio

from ..grpc import BackendPool, Multiplexer, MultiplexerService, WorkerSetup
from ..instances import (
    HealthSettings,
    InstanceManager,
    NvmlReader,
    PortAllocator,
    PortRange,
    Probe,
    ProcessSpawner,
)
from ..models import HubDownloader, InstanceSmokeTest, ModelService, hub_cache_dir
from ..rpc import Authorizer
from ..security import TlsReloader
from ..supervision import TransitionEvent
from .config import ManagerConfig
from .metrics import Metrics
from .muxworkers import WorkerGroup

__all__ = [
    "api_server_config",
    "backend_pool",
    "data_plane",
    "grpc_workers",
    "instance_manager",
    "model_service",
    "multiplexer",
    "tls_reloader",
    "warn_if_open",
]

logger = logging.getLogger("teisup")

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def warn_if_open(config: ManagerConfig, api_token: str | None) -> None:
    """Warn loudly about an API anyone on the network may use."""
    if api_token is None and not config.tls.enabled and config.bind_host not in _LOOPBACK:
        logger.warning(
            "the REST API listens on %s with no API token and no TLS: anyone who can reach "
            "it can start processes on this host. Set TEISUP_API_TOKEN (or api_token_file).",
            config.bind_host,
        )


def tls_reloader(config: ManagerConfig) -> TlsReloader | None:
    """The servers' TLS contexts, files loaded and checked; None without TLS.

    Raises `teisup.security.TlsError` naming a file that cannot be used.
    """
    if not config.tls.enabled:
        return None
    tls = TlsReloader(config.tls)
    tls.reload()
    return tls


def instance_manager(
    config: ManagerConfig,
    *,
    launcher: list[str],
    spawner: ProcessSpawner,
    gpus: NvmlReader,
    probe: Probe,
    environ: dict[str, str],
    metrics: Metrics,
) -> InstanceManager:
    """The instance manager: ports, health checks, logs and limits from the configuration."""
    return InstanceManager(
        launcher=launcher,
        manager_id=config.effective_manager_id,
        spawner=spawner,
        ports=PortAllocator(
            instance_ports=PortRange(config.instance_port_start, config.instance_port_end - 1),
            prometheus_ports=PortRange(
                config.prometheus_port_start, config.prometheus_port_end - 1
            ),
            manager_ports=config.manager_ports(),
        ),
        gpus=gpus,
        probe=probe,
        health=HealthSettings(
            interval=config.health_check_interval_secs,
            timeout=config.health_check_timeout_secs,
            failure_threshold=config.max_failures_before_restart,
        ),
        log_dir=config.effective_log_dir,
        max_instances=config.max_instances,
        base_env=environ,
        default_restart=config.default_restart,
        on_probe=metrics.on_probe,
    )


def model_service(
    config: ManagerConfig,
    manager: InstanceManager,
    environ: dict[str, str],
    subscribe: Callable[[], AbstractContextManager[trio.MemoryReceiveChannel[TransitionEvent]]],
) -> ModelService:
    """The model registry, on the hub cache the instances read (their environment's)."""
    cache = hub_cache_dir(environ)
    return ModelService(
        cache,
        downloader=HubDownloader(cache),
        loader=InstanceSmokeTest(manager, subscribe),
        configured=config.models or (),
    )


def _body_limit(config: ManagerConfig) -> int:
    return config.grpc_max_message_size_mb * 1024 * 1024


def backend_pool(config: ManagerConfig) -> BackendPool:
    """The data plane's connections to the instances."""
    return BackendPool(
        queue_timeout=config.grpc_queue_timeout_secs, max_message_length=_body_limit(config)
    )


def data_plane(
    config: ManagerConfig, manager: InstanceManager, pool: BackendPool, metrics: Metrics
) -> MultiplexerService:
    """Routing, deadlines and observation, shared by the gRPC and HTTP data planes."""
    return MultiplexerService(
        manager,
        pool,
        default_timeout=config.grpc_request_timeout_secs,
        stream_idle_timeout=config.grpc_stream_idle_timeout_secs,
        observer=metrics,
    )


def multiplexer(
    config: ManagerConfig,
    manager: InstanceManager,
    service: MultiplexerService,
    tls: TlsReloader | None,
    authorize: Authorizer,
) -> Multiplexer | None:
    """The in-process gRPC multiplexer on ``grpc_port``; None when ``grpc_enabled`` is
    off or worker processes serve it (``grpc_workers`` > 1)."""
    if not config.grpc_enabled or config.grpc_workers > 1:
        return None
    return Multiplexer(
        manager,
        host=config.bind_host,
        port=config.grpc_port,
        max_message_length=_body_limit(config),
        data_plane=service,
        ssl_context=tls.context(alpn=["h2"]) if tls else None,
        authorize=authorize,
    )


def grpc_workers(
    config: ManagerConfig,
    *,
    manager: InstanceManager,
    spawner: ProcessSpawner,
    metrics: Metrics,
    environ: dict[str, str],
    api_token: str | None,
) -> WorkerGroup | None:
    """The multiplexer's worker processes (``grpc_workers`` > 1), or None."""
    if not config.grpc_enabled or config.grpc_workers == 1:
        return None
    count = config.grpc_workers

    def setup(index: int) -> WorkerSetup:
        return WorkerSetup(
            index=index,
            workers=count,
            host=config.bind_host,
            port=config.grpc_port,
            max_message_length=_body_limit(config),
            default_timeout=config.grpc_request_timeout_secs,
            stream_idle_timeout=config.grpc_stream_idle_timeout_secs,
            queue_timeout=config.grpc_queue_timeout_secs,
            tls=config.tls if config.tls.enabled else None,
            api_token=api_token,
        )

    return WorkerGroup(
        count,
        setup=setup,
        spawner=spawner,
        records=manager.all,
        on_request=metrics.request_done,
        environ=environ,
        manager_id=config.effective_manager_id,
    )


class _TlsConfig(hypercorn.config.Config):
    """hypercorn's settings, serving teisup's own (reloadable, peer-recording) TLS context."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context


def api_server_config(config: ManagerConfig, tls: TlsReloader | None) -> hypercorn.config.Config:
    """hypercorn's settings for the API: the bind, TLS, logging through teisup's."""
    if tls is not None:
        server: hypercorn.config.Config = _TlsConfig(
            tls.context(alpn=["h2", "http/1.1"], record_peer=True)
        )
    else:
        server = hypercorn.config.Config()
    host = config.bind_host
    server.bind = [f"[{host}]:{config.api_port}" if ":" in host else f"{host}:{config.api_port}"]
    server.graceful_timeout = 5.0
    server.accesslog = None
    # Through our logging setup, so --log-format json covers hypercorn too.
    server.errorlog = logging.getLogger("teisup.api")
    return server
