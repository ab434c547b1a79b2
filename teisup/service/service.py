"""The running teisup: the root supervisor and everything hanging off it.

::

    root (one_for_one)
    ├── state-writer   writes the snapshot after every transition; the final one last
    ├── observer       reads every transition: marks the state dirty, counts metrics
    ├── instances      the instances supervisor (InstanceManager)
    ├── backends       the data plane's connections to the instances (BackendPool)
    ├── api            the REST control plane and the HTTP data plane on hypercorn
    ├── grpc           the gRPC multiplexer (when grpc_enabled)
    ├── poller         GPU readings for /gpus and /metrics
    ├── reload         SIGHUP: loads the TLS files again
    ├── reaper         reaps orphans the manager adopts (subreaper, or PID 1)
    └── restore        starts the instances that should run: restored ones at start-up,
                       and all of them again whenever `instances` is restarted

Children stop in reverse order, so on SIGTERM the API stops accepting first,
then every instance stops within its grace, and the state writer, stopping
last, writes the final snapshot.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import time
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import msgspec
import trio
from purerpc import Status, StatusCode

from ..api import create_app
from ..grpc import SERVICE_NAME, BackendPool, Multiplexer, MultiplexerService
from ..instances import (
    Desired,
    GpuInfo,
    HealthSettings,
    InstanceInfo,
    InstanceManager,
    InstanceSpec,
    NvmlReader,
    PortAllocator,
    PortRange,
    ProcessSpawner,
    PynvmlReader,
    resolve_launcher,
    set_child_subreaper,
)
from ..instances.probe import grpc_health_probe
from ..instances.runner import Probe
from ..rpc import Peer
from ..security import AllowList, TlsError, TlsReloader, bearer_matches
from ..supervision import (
    BRUTAL_KILL,
    ChildContext,
    ChildSpec,
    Intensity,
    Supervisor,
)
from .config import ManagerConfig
from .metrics import Metrics
from .state import SavedInstance, Snapshot, StateStore
from .writer import StateStatus, StateWriter

__all__ = ["Service"]

logger = logging.getLogger("teisup")

_SPEC_FIELDS = tuple(f for f in InstanceSpec.__struct_fields__)

#: What a bare ``teisup`` serves with no TEI binary: the packaged CPU model.
DEFAULT_INSTANCE = InstanceSpec(name="minilm", model_id="sentence-transformers/all-MiniLM-L6-v2")


class Service:
    """teisup as one object: build it from a config, `run` it, `stop` it."""

    def __init__(
        self,
        config: ManagerConfig,
        *,
        gpus: NvmlReader | None = None,
        probe: Probe = grpc_health_probe,
        launcher: list[str] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.gpu_reader = gpus or PynvmlReader()
        self.probe = probe
        self.launcher = launcher or resolve_launcher(config.tei_binary_path)
        self.environ = dict(os.environ if environ is None else environ)
        self.store = StateStore(config.state_file)
        #: Resolved once: a missing or empty token file is a start-up error.
        self.api_token = config.resolve_api_token()
        self.protect_health_and_metrics = config.protect_health_and_metrics
        #: Who may connect, beyond what the CA vouches for (REST and gRPC alike).
        self.allow_list = AllowList.of(config.tls)
        #: The live TLS contexts, reloaded on SIGHUP; None without TLS.
        self.tls: TlsReloader | None = None
        self._gpus: list[GpuInfo] = []
        self.api_urls: list[str] = []
        self._root: Supervisor | None = None
        self._manager: InstanceManager | None = None
        self._writer: StateWriter | None = None
        self.multiplexer: Multiplexer | None = None
        self._data_plane: MultiplexerService | None = None
        self.metrics = Metrics(
            instances=self._instances,
            gpus=lambda: list(self._gpus),
            exit_cause=lambda name: (
                self._manager.last_exit_cause(name) if self._manager is not None else None
            ),
        )

    # -- what the API uses ----------------------------------------------------

    @property
    def manager(self) -> InstanceManager:
        assert self._manager is not None, "the service is not running"
        return self._manager

    @property
    def root(self) -> Supervisor:
        assert self._root is not None, "the service is not running"
        return self._root

    async def persist(self) -> bool:
        assert self._writer is not None
        return await self._writer.persist()

    def state_status(self) -> StateStatus:
        assert self._writer is not None
        return self._writer.status()

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def on_created(self, info: InstanceInfo) -> None:
        self.metrics.created.labels(info.name, info.model_id).inc()

    def on_deleted(self, name: str) -> None:
        self.metrics.deleted.labels(name).inc()

    async def probe_now(self, name: str) -> dict[str, Any]:
        info = self.manager.get(name)
        began = time.perf_counter()
        error = await self.probe("127.0.0.1", info.port, self.config.health_check_timeout_secs)
        return {
            "ok": error is None,
            "error": error,
            "latency_ms": round((time.perf_counter() - began) * 1000, 3),
        }

    @property
    def data_plane(self) -> MultiplexerService | None:
        return self._data_plane

    @property
    def data_body_limit(self) -> int:
        return self.config.grpc_max_message_size_mb * 1024 * 1024

    def authorize_grpc(self, peer: Peer, event: Any) -> Status | None:
        """The gRPC servers' gate: the allow-list for every call, the token for the data plane.

        Health and reflection stay open to any client the TLS layer let in, as
        /health does over REST.
        """
        refusal = self.allow_list.refusal(peer.certificate) if self.tls is not None else None
        if refusal is not None:
            return Status(StatusCode.PERMISSION_DENIED, refusal)
        if self.api_token is not None and event.service_name == SERVICE_NAME:
            metadata = {str(k).lower(): v for k, v in event.custom_metadata}
            if not bearer_matches(metadata.get("authorization"), self.api_token):
                return Status(StatusCode.UNAUTHENTICATED, "missing or wrong API token")
        return None

    def _instances(self) -> list[InstanceInfo]:
        return self._manager.all() if self._manager is not None else []

    # -- running ---------------------------------------------------------------

    async def stop(self) -> None:
        """Stop everything in reverse order; return once the final snapshot is written."""
        if self._root is not None:
            await self._root.stop()

    async def run(
        self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `stop` (or until the root supervisor gives up)."""
        config = self.config
        open_api = self.api_token is None and not config.tls.enabled
        if open_api and config.bind_host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(
                "the REST API listens on %s with no API token and no TLS: anyone who can reach "
                "it can start processes on this host. Set TEISUP_API_TOKEN (or api_token_file).",
                config.bind_host,
            )
        if config.tls.enabled:
            # Checked before anything binds: a bad file stops the start, naming it.
            self.tls = TlsReloader(config.tls)
            self.tls.reload()
        if not set_child_subreaper():
            logger.warning("cannot become a child subreaper; orphaned grandchildren go to init")
        async with ProcessSpawner() as spawner:
            manager = InstanceManager(
                launcher=self.launcher,
                manager_id=config.effective_manager_id,
                spawner=spawner,
                ports=PortAllocator(
                    instance_ports=PortRange(
                        config.instance_port_start, config.instance_port_end - 1
                    ),
                    prometheus_ports=PortRange(
                        config.prometheus_port_start, config.prometheus_port_end - 1
                    ),
                    manager_ports=config.manager_ports(),
                ),
                gpus=self.gpu_reader,
                probe=self.probe,
                health=HealthSettings(
                    interval=config.health_check_interval_secs,
                    timeout=config.health_check_timeout_secs,
                    failure_threshold=config.max_failures_before_restart,
                ),
                log_dir=config.effective_log_dir,
                max_instances=config.max_instances,
                base_env=self.environ,
                default_restart=config.default_restart,
                on_probe=self.metrics.on_probe,
            )
            self._manager = manager
            self._writer = StateWriter(
                self.store, self._collect, on_write=self.metrics.on_state_write
            )
            self.metrics.state_status = self._writer.status
            swept = await manager.sweep_leftovers()
            if swept:
                logger.warning("killed %d process(es) left by a previous manager", len(swept))
            self._take_back(self._load())
            pool = BackendPool(
                queue_timeout=config.grpc_queue_timeout_secs,
                max_message_length=self.data_body_limit,
            )
            self.metrics.in_flight = pool.in_flight
            self._data_plane = MultiplexerService(
                manager,
                pool,
                default_timeout=config.grpc_request_timeout_secs,
                stream_idle_timeout=config.grpc_stream_idle_timeout_secs,
                observer=self.metrics,
            )
            grpc = []
            if config.grpc_enabled:
                self.multiplexer = Multiplexer(
                    manager,
                    host=config.bind_host,
                    port=config.grpc_port,
                    max_message_length=self.data_body_limit,
                    data_plane=self._data_plane,
                    ssl_context=self.tls.context(alpn=["h2"]) if self.tls else None,
                    authorize=self.authorize_grpc,
                )
                grpc = [ChildSpec("grpc", self.multiplexer.run, shutdown=30.0)]
            self._root = Supervisor(
                "root",
                [
                    ChildSpec("state-writer", self._writer.run, shutdown=60.0),
                    ChildSpec("observer", self._observe, shutdown=BRUTAL_KILL),
                    ChildSpec("instances", manager.supervisor),
                    ChildSpec("backends", partial(self._run_pool, pool), shutdown=BRUTAL_KILL),
                    ChildSpec("api", self._serve_api, shutdown=30.0),
                    *grpc,
                    ChildSpec("poller", self._poll_gpus, shutdown=BRUTAL_KILL),
                    ChildSpec("reload", self._reload_on_sighup, shutdown=BRUTAL_KILL),
                    ChildSpec("reaper", self._reap, shutdown=BRUTAL_KILL),
                    ChildSpec("restore", manager.keep_children, shutdown=BRUTAL_KILL),
                ],
                intensity=Intensity(max_restarts=10, period=60.0),
            )
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._root.run)
                    task_status.started(self)
            finally:
                manager.close()

    # -- state -------------------------------------------------------------------

    def _load(self) -> Snapshot:
        result = self.store.load()
        self.metrics.state_restore.labels(result.source).inc()
        if result.problem:
            logger.error("state: %s (loaded from: %s)", result.problem, result.source)
        return result.snapshot

    def _take_back(self, snapshot: Snapshot) -> None:
        """Register saved instances, then config seeds not in the state file."""
        manager = self.manager
        for saved in snapshot.instances:
            desired = Desired(saved.desired)
            if not self.config.auto_restore_on_restart:
                desired = Desired.STOPPED
            self._register(_spec_of(saved), saved, desired)
        for seed in self.config.instances:
            if seed.name not in manager.names():
                self._register(seed, None, Desired.RUNNING)
        if not manager.names() and self._embedded and self.config.default_instance:
            logger.info(
                "no instances configured or saved: starting %r (%s) on the embedded backend",
                DEFAULT_INSTANCE.name,
                DEFAULT_INSTANCE.model_id,
            )
            self._register(DEFAULT_INSTANCE, None, Desired.RUNNING)

    @property
    def _embedded(self) -> bool:
        return self.launcher[1:] == ["-m", "teisup.embedded"]

    def _register(self, spec: InstanceSpec, saved: SavedInstance | None, desired: Desired) -> None:
        try:
            self.manager.register(
                spec,
                port=(saved.port if saved else spec.port) or None,
                prometheus_port=(saved.prometheus_port if saved else spec.prometheus_port) or None,
                created_at=saved.created_at if saved else None,
                desired=desired,
                restarts=saved.restarts if saved else 0,
            )
        except (ValueError, LookupError) as exc:
            logger.error("cannot take back instance %r: %s", spec.name, exc)

    def _collect(self) -> list[SavedInstance]:
        out = []
        for record in self.manager.records():
            fields = msgspec.structs.asdict(record.spec)
            fields.update(port=record.ports.port, prometheus_port=record.ports.prometheus_port)
            out.append(
                SavedInstance(
                    **fields,
                    desired=record.desired.value,
                    created_at=record.created_at,
                    restarts=record.restarts,
                    port_pinned=record.spec.port is not None,
                    prometheus_port_pinned=record.spec.prometheus_port is not None,
                )
            )
        return out

    # -- the root's workers ---------------------------------------------------------

    async def _observe(self, ctx: ChildContext) -> None:
        assert self._writer is not None
        with self.root.events.subscribe() as events:
            ctx.started()
            async for event in events:
                self._writer.mark_dirty()
                self.metrics.on_transition(event)

    async def _serve_api(self, ctx: ChildContext) -> None:
        if self.tls is not None:
            config: hypercorn.config.Config = _TlsConfig(
                self.tls.context(alpn=["h2", "http/1.1"], record_peer=True)
            )
        else:
            config = hypercorn.config.Config()
        host = self.config.bind_host
        config.bind = [
            f"[{host}]:{self.config.api_port}" if ":" in host else f"{host}:{self.config.api_port}"
        ]
        config.graceful_timeout = 5.0
        config.accesslog = None
        # Through our logging setup, so --log-format json covers hypercorn too.
        config.errorlog = logging.getLogger("teisup.api")
        app = create_app(self)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=ctx.wait_stop_requested)
            )
            self.api_urls = list(binds)
            logger.info("REST API listening on %s", ", ".join(self.api_urls))
            ctx.started()

    @staticmethod
    async def _run_pool(pool: BackendPool, ctx: ChildContext) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            ctx.started()
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()

    async def _reload_on_sighup(self, ctx: ChildContext) -> None:
        # Always listening: SIGHUP's default action would end teisup abruptly.
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            ctx.started()
            async for _ in signals:
                if self.tls is None:
                    logger.info("SIGHUP: nothing to reload (no TLS configured)")
                    continue
                try:
                    self.tls.reload()
                except (TlsError, ssl.SSLError) as exc:
                    logger.error("SIGHUP: TLS files not reloaded, the old ones stay: %s", exc)
                else:
                    logger.info(
                        "SIGHUP: TLS certificate reloaded from %s (new connections use it)",
                        self.config.tls.cert,
                    )

    async def _poll_gpus(self, ctx: ChildContext) -> None:
        while True:
            self._gpus = await trio.to_thread.run_sync(self.gpu_reader.read)
            ctx.started()
            await trio.sleep(10.0)

    async def _reap(self, ctx: ChildContext) -> None:
        ctx.started()
        await self.manager.reap_orphans()


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


def _spec_of(saved: SavedInstance) -> InstanceSpec:
    """The spec as the user gave it: a port the manager chose is no part of it."""
    fields = msgspec.structs.asdict(saved)
    spec = {k: fields[k] for k in _SPEC_FIELDS}
    if not saved.port_pinned:
        spec["port"] = None
    if not saved.prometheus_port_pinned:
        spec["prometheus_port"] = None
    return InstanceSpec(**spec)
