"""The running teisup: the composition root, the root supervisor and everything hanging off it.

::

    root (one_for_one)
    ├── state-writer   writes the snapshot after changes, retries until it lands; the final one last
    ├── observer       reads every transition: marks the state dirty, counts metrics
    ├── instances      the instances supervisor (InstanceManager)
    ├── backends       the data plane's connections to the instances (BackendPool)
    ├── models         the model registry: discovery, downloads, smoke tests (ModelService)
    ├── api            the REST control plane and the HTTP data plane on hypercorn
    ├── grpc           the gRPC multiplexer (when grpc_enabled, with grpc_workers = 1)
    ├── grpc-worker-N  one per worker process serving the multiplexer (grpc_workers > 1)
    ├── poller         GPU readings for /gpus and /metrics
    ├── reload         SIGHUP: loads the TLS files again
    ├── reaper         reaps orphans the manager adopts (subreaper, or PID 1)
    └── restore        starts the instances that should run: restored ones at start-up,
                       and all of them again whenever `instances` is restarted

Children stop in reverse order, so on SIGTERM the API stops accepting first,
then every instance stops within its grace, and the state writer, stopping
last, writes the final snapshot.

The parts are built from the configuration in `wiring`, the state is taken
back in `restore`, the small workers are in `workers`, and what the front
ends see of all this is `control`; this module only puts them together.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import trio
from quart_trio import QuartTrio

from ..api import create_app
from ..grpc import Multiplexer
from ..instances import (
    InstanceInfo,
    InstanceManager,
    NvmlReader,
    Probe,
    ProcessSpawner,
    PynvmlReader,
    grpc_health_probe,
    resolve_launcher,
    set_child_subreaper,
)
from ..security import AllowList, TlsReloader
from ..supervision import BRUTAL_KILL, ChildSpec, Intensity, Supervisor
from . import restore, wiring, workers
from .config import ManagerConfig
from .control import GrpcGate, ServiceControl
from .metrics import Metrics
from .muxworkers import WorkerGroup
from .state import StateStore
from .writer import StateWriter

__all__ = ["Service"]

logger = logging.getLogger("teisup")


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
        self.probe = probe
        self.launcher = launcher or resolve_launcher(config.tei_binary_path)
        self.environ = dict(os.environ if environ is None else environ)
        self.store = StateStore(config.state_file)
        #: Resolved once: a missing or empty token file is a start-up error.
        self.api_token = config.resolve_api_token()
        #: Who may connect, beyond what the CA vouches for (REST and gRPC alike).
        self.allow_list = AllowList.of(config.tls)
        #: The live TLS contexts, reloaded on SIGHUP; None without TLS.
        self.tls: TlsReloader | None = None
        self.poller = workers.GpuPoller(gpus or PynvmlReader())
        self.metrics = Metrics(
            instances=self._instances,
            gpus=self.poller.readings,
            exit_cause=lambda name: (
                self._control.manager.last_exit_cause(name) if self._control is not None else None
            ),
        )
        self.api: workers.ApiServer | None = None
        self.multiplexer: Multiplexer | None = None
        #: The multiplexer's worker processes, when ``grpc_workers`` > 1.
        self.grpc_workers: WorkerGroup | None = None
        self._control: ServiceControl | None = None
        self._root: Supervisor | None = None

    @property
    def root(self) -> Supervisor:
        """The root supervisor, once `run` has started."""
        assert self._root is not None, "the service is not running"
        return self._root

    @property
    def control(self) -> ServiceControl:
        """What the REST API sees of the service, once `run` has started."""
        assert self._control is not None, "the service is not running"
        return self._control

    @property
    def manager(self) -> InstanceManager:
        """The instance manager, once `run` has started."""
        return self.control.manager

    @property
    def api_urls(self) -> list[str]:
        """Where the REST API listens, once it does."""
        return self.api.urls if self.api is not None else []

    def _instances(self) -> list[InstanceInfo]:
        return self._control.manager.all() if self._control is not None else []

    def _app(self) -> QuartTrio:
        return create_app(self.control)

    async def stop(self) -> None:
        """Stop everything in reverse order; return once the final snapshot is written."""
        if self._root is not None:
            await self._root.stop()

    async def run(
        self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `stop` (or until the root supervisor gives up)."""
        config = self.config
        wiring.warn_if_open(config, self.api_token)
        # Checked before anything binds: a bad file stops the start, naming it.
        self.tls = wiring.tls_reloader(config)
        self.api = workers.ApiServer(self._app, wiring.api_server_config(config, self.tls))
        if not set_child_subreaper():
            logger.warning("cannot become a child subreaper; orphaned grandchildren go to init")
        async with ProcessSpawner() as spawner:
            manager = wiring.instance_manager(
                config,
                launcher=self.launcher,
                spawner=spawner,
                gpus=self.poller.reader,
                probe=self.probe,
                environ=self.environ,
                metrics=self.metrics,
            )
            writer = StateWriter(
                self.store, partial(restore.collect, manager), on_write=self.metrics.on_state_write
            )
            self.metrics.state_status = writer.status
            swept = await manager.sweep_leftovers()
            if swept:
                logger.warning("killed %d process(es) left by a previous manager", len(swept))
            restore.take_back(
                manager,
                config,
                restore.load(self.store, self.metrics),
                embedded=self.launcher[1:] == ["-m", "teisup.embedded"],
                state_file=str(self.store.path),
                metrics=self.metrics,
            )
            pool = wiring.backend_pool(config)
            self.metrics.in_flight = pool.in_flight
            data_plane = wiring.data_plane(config, manager, pool, self.metrics)
            models = wiring.model_service(
                config, manager, self.environ, lambda: self.root.events.subscribe()
            )
            self.metrics.registry.register(models.collector())
            self._control = ServiceControl(
                config,
                manager=manager,
                writer=writer,
                metrics=self.metrics,
                gpus=self.poller.readings,
                probe=self.probe,
                data_plane=data_plane,
                api_token=self.api_token,
                allow_list=self.allow_list,
                tls=self.tls,
                models=models,
            )
            gate = GrpcGate(
                api_token=self.api_token, allow_list=self.allow_list, tls=self.tls is not None
            )
            self.multiplexer = wiring.multiplexer(config, manager, data_plane, self.tls, gate)
            self.grpc_workers = wiring.grpc_workers(
                config,
                manager=manager,
                spawner=spawner,
                metrics=self.metrics,
                environ=self.environ,
                api_token=self.api_token,
            )
            if self.grpc_workers is not None:
                group = self.grpc_workers
                self._control.instances_changed = group.changed
                self.metrics.in_flight = lambda name: pool.in_flight(name) + group.in_flight(name)
            grpc = (
                [ChildSpec("grpc", self.multiplexer.run, shutdown=30.0)]
                if self.multiplexer
                else self.grpc_workers.specs()
                if self.grpc_workers
                else []
            )
            self._root = self._control.root = Supervisor(
                "root",
                [
                    ChildSpec("state-writer", writer.run, shutdown=60.0),
                    ChildSpec(
                        "observer",
                        partial(workers.observe, writer, self.metrics),
                        shutdown=BRUTAL_KILL,
                    ),
                    ChildSpec("instances", manager.supervisor),
                    ChildSpec("backends", partial(workers.run_pool, pool), shutdown=BRUTAL_KILL),
                    ChildSpec("models", models.run, shutdown=BRUTAL_KILL),
                    ChildSpec("api", self.api.run, shutdown=30.0),
                    *grpc,
                    ChildSpec("poller", self.poller.run, shutdown=BRUTAL_KILL),
                    ChildSpec(
                        "reload",
                        partial(
                            workers.reload_on_sighup,
                            self.tls,
                            config.tls.cert,
                            also=self.grpc_workers.reload if self.grpc_workers else None,
                        ),
                        shutdown=BRUTAL_KILL,
                    ),
                    ChildSpec("reaper", partial(workers.reap, manager), shutdown=BRUTAL_KILL),
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
