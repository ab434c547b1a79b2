"""The instances layer's front door: a registry of instances over one supervisor.

`InstanceManager` owns the ``instances`` supervisor (one_for_one, no
supervisor-wide intensity: each instance gives up on its own) and everything
an instance needs besides its process: its ports, its log, its GPU check. The
REST control plane and the gRPC multiplexer talk to it, never to processes.

An instance's state is its supervised child's state (`ChildState`: stopped,
starting, running, unhealthy, backoff, stopping, failed), so every transition
goes through the supervision core's transition hook.

The manager, not the supervisor, is the record of which instances exist and
what each should be doing (`Desired`): a restarted ``instances`` supervisor
starts empty, as in OTP, and `InstanceManager.keep_children` starts again
every instance that should be running.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
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
    ChildContext,
    ChildSpec,
    ChildState,
    ExitReason,
    RestartType,
    Supervisor,
    SupervisorNotRunning,
    TreeNode,
    UnknownChildError,
)
from .exits import InstanceExit, signal_name
from .gpus import NvmlReader, validate_gpu_id
from .health import HealthSettings
from .identity import PortOwnerCheck, proc_port_owner
from .launch import INSTANCE_MARKER, MANAGER_MARKER
from .logs import InstanceLog, LogLine
from .ports import PortAllocator, PortError, Ports
from .probe import served_model_id
from .process import ProcessSpawner, sweep_leftovers
from .runner import InstanceRunner, ModelCheck, PhaseListener, Probe, ProbeListener, RunStatus
from .spec import InstanceSpec, RestartPolicy
from .startup import Phase

__all__ = [
    "Desired",
    "InstanceExists",
    "InstanceInfo",
    "InstanceManager",
    "InstanceNotFound",
    "InstanceRecord",
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


class Desired(enum.Enum):
    """What the user asked of an instance last (its value is the state file's)."""

    RUNNING = "running"
    STOPPED = "stopped"


class InstanceRecord(msgspec.Struct, frozen=True):
    """What a state snapshot keeps of one instance."""

    spec: InstanceSpec
    ports: Ports
    created_at: str
    desired: Desired
    #: Restarts so far, across manager restarts.
    restarts: int


class InstanceInfo(msgspec.Struct, frozen=True):
    """One instance as the API shows it (tei-manager's fields, then ours)."""

    name: str
    model_id: str
    port: int
    status: ChildState
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
    #: The line an operator should read: what the last run died of (its own
    #: error line), or the failing health check of a running instance.
    last_error: str | None
    desired: Desired
    spec: InstanceSpec
    #: Where the current run is on its way to serving (None: no process runs).
    phase: Phase | None = None
    #: Seconds since the current run was spawned.
    phase_elapsed_secs: float | None = None
    #: A download's percentage, when the instance prints one.
    phase_progress: float | None = None
    #: When the last run ended (RFC 3339), with its exit status or the
    #: signal that killed it when it exited by itself.
    last_exit_at: str | None = None
    last_exit_code: int | None = None
    last_exit_signal: str | None = None


@dataclass
class _Instance:
    spec: InstanceSpec
    ports: Ports
    log: InstanceLog
    created_at: str
    status: RunStatus = field(default_factory=RunStatus)
    #: What the user asked for last. Restored after a manager restart; a
    #: failed instance still wants to run.
    desired: Desired = Desired.RUNNING
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
        on_phase: PhaseListener | None = None,
        port_owner: PortOwnerCheck = proc_port_owner,
        model_check: ModelCheck | None = served_model_id,
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
        self.on_phase = on_phase
        self.port_owner = port_owner
        self.model_check = model_check
        # Instances are independent: at shutdown they all get SIGTERM at once,
        # so stopping N of them takes the longest grace, not the sum.
        # An instance's transitions are news to an operator: INFO, tagged.
        self.supervisor = Supervisor(
            "instances",
            intensity=None,
            max_children=max_instances,
            parallel_shutdown=True,
            transition_log_level=logging.INFO,
            child_label="instance",
        )
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
        desired = Desired.RUNNING if start else Desired.STOPPED
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
        instance.desired = Desired.RUNNING
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
            self._require(name).desired = Desired.STOPPED
            if self._state(name) is not None:
                await self.supervisor.terminate_child(name)
            return self.get(name)

    async def restart(self, name: str) -> InstanceInfo:
        """Stop the instance if it runs, then start it with a clean history."""
        async with self._serial():
            instance = self._require(name)
            instance.desired = Desired.RUNNING
            instance.status.start_requested = True
            if self._state(name) is None:
                await self.supervisor.start_child(self._child_spec(instance))
            else:
                await self.supervisor.restart_child(name)
            return self.get(name)

    async def delete(self, name: str) -> None:
        """Stop an instance and forget it, releasing its ports and removing its log files."""
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
        desired: Desired,
        restarts: int = 0,
    ) -> None:
        """Take back an instance from a state snapshot, keeping its ports.

        ``port`` / ``prometheus_port`` are the ports it had; ``spec``'s own
        say whether the user chose them (set) or the manager did (None). A
        port the manager chose that another process has taken meanwhile is
        replaced by a fresh one (logged); one the user chose is kept.

        Nothing starts here: `keep_children` starts the ones whose
        ``desired`` is running.
        """
        if spec.name in self._instances:
            raise InstanceExists(f"instance {spec.name!r} already exists")
        if port is not None and prometheus_port is not None:
            ports = self.ports.reserve(spec.name, port, prometheus_port)
            ports = self._replace_taken(spec, ports)
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

    def _replace_taken(self, spec: InstanceSpec, ports: Ports) -> Ports:
        """``ports``, with the automatically assigned ones that are taken replaced."""
        port_taken = not self.ports.bindable(ports.port)
        prometheus_taken = not self.ports.bindable(ports.prometheus_port)
        move_port = port_taken and spec.port is None
        move_prometheus = prometheus_taken and spec.prometheus_port is None
        if port_taken and not move_port:
            logger.warning(
                "instance %s: its port %d is taken by another process; it was set for this "
                "instance, so it is kept, and the instance cannot start until it is free",
                spec.name,
                ports.port,
            )
        if not (move_port or move_prometheus):
            return ports
        try:
            fresh = self.ports.reassign(spec.name, port=move_port, prometheus_port=move_prometheus)
        except PortError as exc:
            logger.error("instance %s: its saved ports are taken: %s", spec.name, exc)
            return ports
        logger.warning(
            "instance %s: saved ports %d/%d are taken by another process; it gets %d/%d",
            spec.name,
            ports.port,
            ports.prometheus_port,
            fresh.port,
            fresh.prometheus_port,
        )
        return fresh

    def desired_state(self, name: str) -> Desired:
        """What the user last asked of the instance."""
        return self._require(name).desired

    def records(self) -> list[InstanceRecord]:
        """Per instance (by name), what a snapshot keeps."""
        return [
            InstanceRecord(i.spec, i.ports, i.created_at, i.desired, i.restarts)
            for _, i in sorted(self._instances.items())
        ]

    def last_exit_cause(self, name: str) -> InstanceExit | None:
        """How the instance's last run ended (None if it has not ended one, or is gone)."""
        instance = self._instances.get(name)
        return instance.status.last_exit if instance is not None else None

    async def keep_children(self, ctx: ChildContext) -> None:
        """A worker that keeps the supervisor's children in line with `Desired`.

        At once, and again whenever the ``instances`` supervisor (re)starts,
        every instance that should run and has no child is started: restored
        instances at start-up, and all of them after the supervisor was
        restarted, which brings it back empty. Run it in the same tree, after
        `supervisor`; stopped instances stay stopped.
        """
        with self.supervisor.events.subscribe() as events:
            ctx.started()
            await self._bring_back()
            async for event in events:
                if event.child_id == self.supervisor.id and event.new is ChildState.RUNNING:
                    await self._bring_back()

    async def _bring_back(self) -> None:
        for name in self.names():
            async with self._serial():
                instance = self._instances.get(name)
                if (
                    instance is None
                    or instance.desired is not Desired.RUNNING
                    or self._state(name) is not None
                ):
                    continue
                try:
                    await self._start(name)
                except SupervisorNotRunning:
                    return  # stopping, or restarting: the next RUNNING brings it back
                except Exception as exc:  # one bad instance must not stop the others
                    logger.error("cannot start instance %r: %s", name, exc)

    async def _forget(self, name: str) -> None:
        if self._state(name) is not None:
            await self.supervisor.terminate_child(name)
            # A temporary child's spec goes by itself when it stops.
            with contextlib.suppress(UnknownChildError):
                await self.supervisor.delete_child(name)
        instance = self._instances.pop(name)
        self.ports.release(name)
        # Its log goes with it: a later instance of the same name starts a fresh one.
        instance.log.remove()

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
        ended = status.last_exit
        return InstanceInfo(
            name=name,
            model_id=spec.model_id,
            port=instance.ports.port,
            status=ChildState(node.state) if node else ChildState.STOPPED,
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
            last_exit=(
                node.last_exit
                if node and node.last_exit
                else status.last_exit.reason()
                if status.last_exit
                else None
            ),
            last_error=status.last_error or None,
            desired=instance.desired,
            spec=spec,
            phase=status.phase,
            phase_elapsed_secs=(
                round(trio.current_time() - status.spawned_at, 3) if status.phase else None
            ),
            phase_progress=status.progress,
            last_exit_at=_rfc3339(status.exited_at) if status.exited_at else None,
            last_exit_code=ended.status if ended else None,
            last_exit_signal=signal_name(ended.signal) if ended and ended.signal else None,
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
                self.spawner.reap_adopted_orphans()

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
            on_phase=self.on_phase,
            port_owner=self.port_owner,
            model_check=self.model_check,
            reassign=lambda: self._reassign(instance),
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

    def _reassign(self, instance: _Instance) -> Ports | None:
        """Fresh ports for an instance whose port is taken; None if the user set it.

        Raises `PortError` when no other port is free.
        """
        spec = instance.spec
        if spec.port is not None:
            return None
        fresh = self.ports.reassign(
            spec.name,
            port=True,
            prometheus_port=spec.prometheus_port is None
            and not self.ports.bindable(instance.ports.prometheus_port),
        )
        instance.ports = fresh
        return fresh
