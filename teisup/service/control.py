"""What the front ends see of the running service: the control plane and the gRPC gate.

`ServiceControl` is the `teisup.api.ControlPlane` the REST app is built on:
the instance manager, the supervision tree, the state writer's durability,
GPU readings, metrics, the data plane, and the access settings. `GrpcGate`
(`teisup.grpc`, exported here too) is the gRPC servers' authorizer, applying
the same allow-list and token as the REST app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..grpc import GrpcGate, MultiplexerService
from ..instances import GpuInfo, InstanceInfo, InstanceManager, Probe
from ..models import ModelService
from ..security import AllowList, TlsReloader
from ..supervision import Supervisor
from .config import ManagerConfig
from .metrics import Metrics
from .writer import StateStatus, StateWriter

__all__ = ["GrpcGate", "ServiceControl"]


class ServiceControl:
    """The running service as the REST API uses it (`teisup.api.ControlPlane`)."""

    def __init__(
        self,
        config: ManagerConfig,
        *,
        manager: InstanceManager,
        writer: StateWriter,
        metrics: Metrics,
        gpus: Callable[[], list[GpuInfo]],
        probe: Probe,
        data_plane: MultiplexerService | None,
        api_token: str | None,
        allow_list: AllowList,
        tls: TlsReloader | None,
        models: ModelService,
    ) -> None:
        self.manager = manager
        self.models = models
        self.data_plane = data_plane
        self.api_token = api_token
        self.protect_health_and_metrics = config.protect_health_and_metrics
        self.allow_list = allow_list
        self.tls = tls
        self.data_body_limit = config.grpc_max_message_size_mb * 1024 * 1024
        self.instance_defaults = config.instance_defaults()
        self._health_timeout = config.health_check_timeout_secs
        self._writer = writer
        self._metrics = metrics
        self._gpus = gpus
        self._probe = probe
        self._root: Supervisor | None = None
        #: Called when an instance is created or deleted (the gRPC workers' feed).
        self.instances_changed: Callable[[], None] | None = None

    @property
    def root(self) -> Supervisor:
        """The root supervisor (set once it is built, before anything serves)."""
        assert self._root is not None, "the service is not running"
        return self._root

    @root.setter
    def root(self, root: Supervisor) -> None:
        self._root = root

    async def persist(self) -> bool:
        """Have the current state written; True once durable (a bounded wait)."""
        return await self._writer.persist()

    def state_status(self) -> StateStatus:
        """Whether the state file holds every applied change."""
        return self._writer.status()

    def gpus(self) -> list[GpuInfo]:
        """The latest GPU readings."""
        return self._gpus()

    def render_metrics(self) -> bytes:
        """The Prometheus text of every series."""
        return self._metrics.render()

    def on_created(self, info: InstanceInfo) -> None:
        """Count a created instance."""
        self._metrics.created.labels(info.name, info.model_id).inc()
        if self.instances_changed is not None:
            self.instances_changed()

    def on_deleted(self, name: str) -> None:
        """Count a deleted instance."""
        self._metrics.deleted.labels(name).inc()
        if self.instances_changed is not None:
            self.instances_changed()

    async def probe_now(self, name: str) -> dict[str, Any]:
        """Probe an instance once, now: whether it answered, why not, how fast."""
        info = self.manager.get(name)
        began = time.perf_counter()
        error = await self._probe("127.0.0.1", info.port, self._health_timeout)
        return {
            "ok": error is None,
            "error": error,
            "latency_ms": round((time.perf_counter() - began) * 1000, 3),
        }
