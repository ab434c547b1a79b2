"""The instances layer's front door: a registry of instances over one supervisor.

`InstanceManager` owns the ``instances`` supervisor (one_for_one, no
supervisor-wide intensity: each instance gives up on its own) and everything
an instance needs besides its process: its ports, its log, its GPU check. The
REST control plane and the gRPC multiplexer talk to it, never to processes.

An instance's state is its supervised child's state (`ChildState`: stopped,
starting, running, unhealthy, backoff, stopping, failed), so every transition
goes through the supervision core's transition hook.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from ..supervision import (
    ChildSpec,
    ChildState,
    ExitReason,
    RestartType,
    Supervisor,
    TreeNode,
)
from ..supervision.errors import UnknownChildError
from .gpus import NvmlReader, validate_gpu_id
from .health import HealthSettings
from .launch import INSTANCE_MARKER, MANAGER_MARKER
from .logs import InstanceLog, LogLine
from .ports import PortAllocator, Ports
from .process import ProcessSpawner, reap_adopted_orphans, sweep_leftovers
from .runner import InstanceRunner, Probe, ProbeListener, RunStatus
from .spec import InstanceSpec, RestartPolicy

__all__ = [
    "InstanceExists",
    "InstanceInfo",
    "InstanceManager",
    "InstanceNotFound",
    "LauncherError",
    "MaxInstancesReached",
    "resolve_launcher",
]

logger = logging.getLogger("teisup.instances")

#: The supervisor waits this long beyond an instance's own SIGTERM grace before
#: it cancels the runner (which then SIGKILLs the group itself).
_SHUTDOWN_MARGIN = 10.0


class InstanceNotFound(LookupError):
    """No instance of that name."""


class InstanceExists(ValueError):
    """An instance of that name already exists."""


class MaxInstancesReached(ValueError):
    """The manager already holds ``max_instances`` instances."""


class InstanceInfo(msgspec.Struct, frozen=True):
    """One instance as the API shows it (tei-manager's fields, then ours)."""

    name: str
    model_id: str
    port: int
    status: str
    pid: int | None
    created_at: str
    uptime_secs: float | None
    restarts: int
    health_check_failures: int
    last_health_check: str | None
    gpu_id: int | None
    prometheus_port: int
    restart_policy: str
    restarts_in_window: int
    next_restart_in: float | None
    last_exit: ExitReason | None
    last_error: str | None
    desired: str
    spec: InstanceSpec


@dataclass
class _Instance:
    spec: InstanceSpec
    ports: Ports
    log: InstanceLog
    created_at: str
    status: RunStatus = field(default_factory=RunStatus)
    #: What the user asked for last: "running" or "stopped". Restored after a
    #: manager restart; a failed instance still wants to run.
    desired: str = "running"
    #: Restarts before the current manager process (from the state file).
    earlier_restarts: int = 0

    @property
    def restarts(self) -> int:
        return self.earlier_restarts + self.status.restarts


class LauncherError(ValueError):
    """The configured TEI binary cannot be run (missing, not a file, not
    executable); the message names the path and why."""


#: TEI's router, looked up on PATH when no binary is configured.
TEI_ROUTER = "text-embeddings-router"


def resolve_launcher(tei_binary_path: str | None) -> list[str]:
    """The command that starts a router.

    A configured binary (``TEI_BINARY_PATH`` or ``tei_binary_path``) must be
    an executable file, else `LauncherError`: a typo never turns silently
    into a different backend. A bare name is looked up on PATH. With nothing
    configured, ``text-embeddings-router`` on PATH, else the embedded backend
    (``python -m teisup.embedded``).
    """
    if tei_binary_path:
        return [_check_binary(tei_binary_path)]
    found = shutil.which(TEI_ROUTER)
    if found:
        return [found]
    logger.info(
        "no TEI binary configured and no %s on PATH; using the embedded backend", TEI_ROUTER
    )
    return [sys.executable, "-m", "teisup.embedded"]


def _check_binary(configured: str) -> str:
    if os.sep not in configured:
        found = shutil.which(configured)
        if found is None:
            raise LauncherError(f"TEI binary {configured!r}: not found on PATH")
        return found
    path = Path(configured)
    try:
        is_file = path.is_file()
        exists = is_file or path.exists()
    except OSError as exc:  # a path too long, a component we may not search
        raise LauncherError(f"TEI binary {configured}: {exc.strerror or exc}") from None
    if not exists:
        raise LauncherError(f"TEI binary {configured}: no such file")
    if not is_file:
        raise LauncherError(f"TEI binary {configured}: not a regular file")
    if not os.access(path, os.X_OK):
        raise LauncherError(f"TEI binary {configured}: not executable")
    return configured


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


class InstanceManager:
    """Create, start, stop, restart and delete instances; report on them.

    Run `supervisor` in the tree (``ChildSpec("instances", manager.supervisor)``)
    inside ``async with ProcessSpawner() as spawner``, which must outlive it.
    """

    def __init__(
        self,
        *,
        launcher: Sequence[str],
        manager_id: str,
        spawner: ProcessSpawner,
        ports: PortAllocator,
        gpus: NvmlReader,
        probe: Probe,
        health: HealthSettings | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        max_instances: int | None = None,
        base_env: Mapping[str, str] | None = None,
        default_restart: RestartPolicy | None = None,
        on_probe: ProbeListener | None = None,
    ) -> None:
        self.launcher = list(launcher)
        self.manager_id = manager_id
        self.spawner = spawner
        self.ports = ports
        self.gpus = gpus
        self.probe = probe
        self.health = health or HealthSettings()
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.max_instances = max_instances
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.default_restart = default_restart or RestartPolicy()
        self.on_probe = on_probe
        self.supervisor = Supervisor("instances", intensity=None, max_children=max_instances)
        self._instances: dict[str, _Instance] = {}
        # Lifecycle calls are serial and run to completion even if their caller
        # goes away: a check and the action it decides on never interleave with
        # another call, and a cancelled create never leaves half an instance.
        self._lock = trio.Lock()

    # -- lifecycle calls ----------------------------------------------------------

    async def create(self, spec: InstanceSpec, *, start: bool = True) -> InstanceInfo:
        """Register a new instance (and start it unless ``start`` is False).

        Raises `InstanceExists`, `MaxInstancesReached`, `InvalidGpuId` or a
        `PortError` before anything is started; nothing is kept on error.
        """
        async with self._serial():
            return await self._create(spec, start)

    @contextlib.asynccontextmanager
    async def _serial(self) -> AsyncIterator[None]:
        with trio.CancelScope(shield=True):
            async with self._lock:
                yield

    async def _create(self, spec: InstanceSpec, start: bool) -> InstanceInfo:
        if spec.name in self._instances:
            raise InstanceExists(f"instance {spec.name!r} already exists")
        if self.max_instances is not None and len(self._instances) >= self.max_instances:
            raise MaxInstancesReached(
                f"already {len(self._instances)} instances (max_instances={self.max_instances})"
            )
        if spec.gpu_id is not None:
            gpus = await trio.to_thread.run_sync(self.gpus.read)
            validate_gpu_id(spec.gpu_id, gpus, unavailable_reason=self.gpus.unavailable_reason)
        ports = self.ports.allocate(spec.name, spec.port or None, spec.prometheus_port or None)
        log = InstanceLog(spec.name, directory=self.log_dir)
        created = _rfc3339(time.time())
        desired = "running" if start else "stopped"
        self._instances[spec.name] = _Instance(spec, ports, log, created, desired=desired)
        if start:
            try:
                await self._start(spec.name)
            except BaseException:
                await self._forget(spec.name)
                raise
        return self.get(spec.name)

    async def start(self, name: str) -> InstanceInfo:
        """Start an instance; a no-op for one that is starting or running.

        A ``failed`` or ``stopped`` instance starts with a clean restart history.
        """
        async with self._serial():
            return await self._start(name)

    async def _start(self, name: str) -> InstanceInfo:
        instance = self._require(name)
        instance.desired = "running"
        state = self._state(name)
        if state is None:
            instance.status.start_requested = True
            await self.supervisor.start_child(self._child_spec(instance))
        elif state in (ChildState.STOPPED, ChildState.FAILED, ChildState.STOPPING):
            instance.status.start_requested = True
            await self.supervisor.restart_child(name)
        # starting, running, unhealthy, backoff: already on its way.
        return self.get(name)

    async def stop(self, name: str) -> InstanceInfo:
        """Stop an instance (SIGTERM, grace, SIGKILL); a no-op if it is stopped."""
        async with self._serial():
            self._require(name).desired = "stopped"
            if self._state(name) is not None:
                await self.supervisor.terminate_child(name)
            return self.get(name)

    async def restart(self, name: str) -> InstanceInfo:
        """Stop the instance if it runs, then start it with a clean history."""
        async with self._serial():
            instance = self._require(name)
            instance.desired = "running"
            instance.status.start_requested = True
            if self._state(name) is None:
                await self.supervisor.start_child(self._child_spec(instance))
            else:
                await self.supervisor.restart_child(name)
            return self.get(name)

    async def delete(self, name: str) -> None:
        """Stop an instance and forget it, releasing its ports."""
        async with self._serial():
            self._require(name)
            await self._forget(name)

    def register(
        self,
        spec: InstanceSpec,
        *,
        port: int | None,
        prometheus_port: int | None,
        created_at: str | None,
        desired: str,
        restarts: int = 0,
    ) -> None:
        """Take back an instance from a state snapshot, keeping its ports.

        Nothing starts here: call `start` for the ones whose ``desired`` is
        running (the service does, in the background).
        """
        if spec.name in self._instances:
            raise InstanceExists(f"instance {spec.name!r} already exists")
        if port is not None and prometheus_port is not None:
            ports = self.ports.reserve(spec.name, port, prometheus_port)
        else:
            ports = self.ports.allocate(spec.name, port, prometheus_port)
        log = InstanceLog(spec.name, directory=self.log_dir)
        self._instances[spec.name] = _Instance(
            spec,
            ports,
            log,
            created_at or _rfc3339(time.time()),
            desired=desired,
            earlier_restarts=restarts,
        )

    def desired_state(self, name: str) -> str:
        return self._require(name).desired

    def records(self) -> list[tuple[InstanceSpec, Ports, str, str, int]]:
        """Per instance, what a snapshot keeps: spec, ports, created_at,
        desired state, restarts so far."""
        return [
            (i.spec, i.ports, i.created_at, i.desired, i.restarts)
            for _, i in sorted(self._instances.items())
        ]

    async def _forget(self, name: str) -> None:
        if self._state(name) is not None:
            await self.supervisor.terminate_child(name)
            # A temporary child's spec goes by itself when it stops.
            with contextlib.suppress(UnknownChildError):
                await self.supervisor.delete_child(name)
        instance = self._instances.pop(name)
        self.ports.release(name)
        instance.log.close()

    def close(self) -> None:
        """Close the instances' log files (after the supervisor has stopped)."""
        for instance in self._instances.values():
            instance.log.close()

    # -- reading ---------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._instances)

    def get(self, name: str) -> InstanceInfo:
        return self._info(name, self._nodes())

    def _nodes(self) -> dict[str, TreeNode]:
        return {node.id: node for node in self.supervisor.snapshot().children}

    def _info(self, name: str, nodes: dict[str, TreeNode]) -> InstanceInfo:
        instance = self._require(name)
        node = nodes.get(name)
        spec, status = instance.spec, instance.status
        return InstanceInfo(
            name=name,
            model_id=spec.model_id,
            port=instance.ports.port,
            status=node.state if node else ChildState.STOPPED.value,
            pid=node.pid if node else None,
            created_at=instance.created_at,
            uptime_secs=node.uptime if node else None,
            restarts=instance.restarts,
            health_check_failures=status.health_check_failures,
            last_health_check=(
                _rfc3339(status.last_health_check) if status.last_health_check else None
            ),
            gpu_id=spec.gpu_id,
            prometheus_port=instance.ports.prometheus_port,
            restart_policy=self.restart_policy(name).type.value,
            restarts_in_window=node.restarts_in_window if node else 0,
            next_restart_in=node.next_restart_in if node else None,
            last_exit=node.last_exit if node and node.last_exit else status.last_exit,
            last_error=status.last_error or None,
            desired=instance.desired,
            spec=spec,
        )

    def all(self) -> list[InstanceInfo]:
        """Every instance, sorted by name (one snapshot of the supervisor for all)."""
        nodes = self._nodes()
        return [self._info(name, nodes) for name in self.names()]

    def restart_policy(self, name: str) -> RestartPolicy:
        """The instance's own restart policy, or the manager's default."""
        return self._require(name).spec.restart or self.default_restart

    def logs(self, name: str, start: int | None = None, end: int | None = None) -> list[LogLine]:
        return self._require(name).log.lines(start, end)

    def owned_pids(self) -> set[int]:
        """Pids of the instance processes this manager waits for itself."""
        return self.spawner.owned_pids()

    async def sweep_leftovers(self, *, grace: float = 5.0) -> list[int]:
        """Kill processes a previous manager with this ``manager_id`` left behind.

        Run it at start-up, before any instance starts, so their ports are free.
        """
        # Both markers: only processes started as one of our instances qualify.
        return await sweep_leftovers(
            {MANAGER_MARKER: self.manager_id}, required=(INSTANCE_MARKER,), grace=grace
        )

    async def reap_orphans(self) -> None:
        """Reap adopted orphans on every SIGCHLD, until cancelled.

        As a child subreaper (or PID 1) the manager inherits orphaned
        grandchildren; this keeps their zombies from piling up.
        """
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            async for _ in signals:
                reap_adopted_orphans(self.owned_pids())

    # -- internals -------------------------------------------------------------

    def _require(self, name: str) -> _Instance:
        try:
            return self._instances[name]
        except KeyError:
            raise InstanceNotFound(f"instance {name!r} not found") from None

    def _state(self, name: str) -> ChildState | None:
        for child in self.supervisor.which_children():
            if child.id == name:
                return child.state
        return None

    def _child_spec(self, instance: _Instance) -> ChildSpec:
        spec = instance.spec
        runner = InstanceRunner(
            spec,
            instance.ports,
            launcher=self.launcher,
            spawner=self.spawner,
            log=instance.log,
            probe=self.probe,
            health=self.health,
            manager_id=self.manager_id,
            base_env=self.base_env,
            status=instance.status,
            on_probe=self.on_probe,
        )
        policy = spec.restart or self.default_restart
        return ChildSpec(
            spec.name,
            runner,
            restart=RestartType(policy.type),
            shutdown=spec.stop_grace_secs + _SHUTDOWN_MARGIN,
            backoff=policy.backoff,
            intensity=policy.intensity,
            await_ready=False,
        )
