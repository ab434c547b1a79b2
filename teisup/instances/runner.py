"""The supervised worker of one instance: one OS process per run.

Each run spawns the router, pumps its output into the instance's log, probes
it until ready (reporting ``ctx.started``), keeps probing while it runs
(reporting health), and ends in one of four ways:

* the process exits by itself: noticed at once through its pidfd, the rest of
  its process group is killed, and the exit code becomes the `ExitReason`
  (with the last log lines, so a model that fails to load says why);
* the supervisor asks it to stop: SIGTERM to the group, the grace period,
  then SIGKILL to the group;
* too many failed probes, no readiness within the start-up budget, or a
  stranger on its port: the group is killed and the run ends abnormally, so
  the restart policy decides;
* cancellation: the group is SIGKILLed before the task goes.

Each way is an `InstanceExit` with its `ExitCause`, kept in `RunStatus`.

**Ready means ours.** A probe that answers counts only when the listener on
the port belongs to the instance's process group (`identity`), or, where the
kernel's tables cannot be read, when the server answering says it serves the
instance's model. A stranger seen listening on the port while the instance
starts ends the run at once (`ExitCause.PORT_TAKEN`), as does the process's
own "Address already in use": the manager then gives an automatically
assigned port a fresh one before the next run (`reassign`); a port the user
set stays, and the exit names it.

The restart decision itself is the supervisor's (`teisup.supervision`).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import trio

from ..supervision import ChildContext, ExitReason
from .exits import ExitCause, InstanceExit
from .health import HealthPolicy, HealthSettings, Verdict
from .identity import PortOwner, PortOwnerCheck, proc_port_owner
from .launch import INSTANCE_HOST, build_argv, build_env
from .logs import InstanceLog, LogLine, is_ready_line, pump
from .ports import PortError, Ports
from .process import ProcessSpawner, kill_group, kill_tree, wait_for_exit
from .spec import InstanceSpec
from .startup import Phase, summarize_error
from .startup import classify as classify_line

__all__ = [
    "InstanceRunner",
    "ModelCheck",
    "PhaseListener",
    "Probe",
    "ProbeListener",
    "Reassign",
    "RunStatus",
    "Wake",
    "describe_exit",
    "says_port_taken",
]

logger = logging.getLogger("teisup.instances")

#: ``probe(host, port, timeout)`` -> None when the instance answers, else why not.
Probe = Callable[[str, int, float], Awaitable[str | None]]
#: ``listener(instance, seconds, ok, was_ready)``, called after every probe.
ProbeListener = Callable[[str, float, bool, bool], None]
#: ``check(host, port, timeout)`` -> the model id the server there says it
#: serves, or None when it does not answer. The identity check where the
#: kernel's socket tables cannot be read.
ModelCheck = Callable[[str, int, float], Awaitable[str | None]]
#: ``listener(instance, phase)``, called as a run enters each start-up phase.
PhaseListener = Callable[[str, Phase], None]
#: Called when a run ended because its port is taken: the instance's new
#: ports, or None when its port was set by the user and must not change;
#: raises `PortError` when no other port is free.
Reassign = Callable[[], Ports | None]


class Wake(enum.Enum):
    """What woke the runner's main loop before its next probe was due."""

    #: The process logged its ``Ready`` line: probe at once.
    READY_LINE = "ready-line"
    #: The process exited.
    EXIT = "exit"
    #: The supervisor asked the instance to stop.
    STOP = "stop"


#: What a process that could not bind its port prints (TEI via Rust's io
#: error, the embedded backend and the test double via Python's OSError).
_ADDRESS_IN_USE = ("Address already in use", "os error 98", "[Errno 98]", "EADDRINUSE")


def says_port_taken(text: str) -> bool:
    """Whether a process's last words say it could not bind a port in use."""
    return any(marker in text for marker in _ADDRESS_IN_USE)


@dataclass
class RunStatus:
    """What the runner knows beyond the supervisor's state, for the API."""

    #: Runs that were restarts by the policy (not starts asked for).
    restarts: int = 0
    #: Set by an asked-for start, so the run it causes is not counted a restart.
    start_requested: bool = True
    pid: int | None = None
    health_check_failures: int = 0
    last_health_check: float | None = None  # wall-clock seconds of the last success
    #: The error an operator should read: the line the process died of (kept
    #: after the run, until a run is ready), or a failed health check's.
    last_error: str = ""
    #: The current run's start-up phase (None when no process runs), when the
    #: run was spawned (on the runner's clock), and a download's percentage.
    phase: Phase | None = None
    spawned_at: float = 0.0
    progress: float | None = None
    #: Wall-clock seconds at which the last run ended.
    exited_at: float | None = None
    #: How the last run ended (kept here too: a temporary instance's child
    #: record disappears from the supervisor when it exits).
    last_exit: InstanceExit | None = None


def describe_exit(returncode: int, log: InstanceLog) -> InstanceExit:
    """How a process that exited by itself ended, with the line it died of.

    A process that says retrying cannot help (`summarize_error`) ends with
    `ExitCause.PERMANENT_ERROR`, which is not restarted.
    """
    if not returncode:
        return InstanceExit.of_returncode(returncode)
    summary = summarize_error(_messages(log), status=returncode)
    exit = InstanceExit.of_returncode(returncode, summary.text if summary else "")
    if summary is not None and summary.permanent and exit.cause is ExitCause.CRASHED:
        return msgspec.structs.replace(exit, cause=ExitCause.PERMANENT_ERROR)
    return exit


def _messages(log: InstanceLog, lines: int = 50) -> list[str]:
    return [line.message if line.message is not None else line.text for line in log.tail(lines)]


def last_words(log: InstanceLog, lines: int = 3) -> str:
    """The last few log lines, led by the last ``Error:`` line if there is one.

    TEI prints a fatal error as ``Error: <context>`` followed by a ``Caused
    by:`` chain, so the plain tail alone can miss the line that says what went
    wrong.
    """
    recent = log.tail(50)
    texts = [(line.message or line.text).strip() for line in recent]
    texts = [t for t in texts if t]
    errors = [t for t in texts if t.startswith("Error:")]
    picked = texts[-lines:]
    if errors and errors[-1] not in picked:
        picked = [errors[-1], *picked]
    return " | ".join(picked)


def _stopping(ctx: ChildContext) -> bool:
    # A call, not a property read, so that type checkers do not assume the
    # answer cannot change across an await.
    return ctx.stop_requested


class InstanceRunner:
    """A worker function (``await runner(ctx)``) for one instance's child spec."""

    def __init__(
        self,
        spec: InstanceSpec,
        ports: Ports,
        *,
        launcher: Sequence[str],
        spawner: ProcessSpawner,
        log: InstanceLog,
        probe: Probe,
        health: HealthSettings,
        manager_id: str,
        base_env: Mapping[str, str] | None = None,
        status: RunStatus | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] | None = None,
        on_probe: ProbeListener | None = None,
        on_phase: PhaseListener | None = None,
        port_owner: PortOwnerCheck = proc_port_owner,
        model_check: ModelCheck | None = None,
        reassign: Reassign | None = None,
    ) -> None:
        self.spec = spec
        #: The ports of the next (or current) run; `reassign` may change them
        #: between runs.
        self.ports = ports
        self.launcher = list(launcher)
        self.spawner = spawner
        self.log = log
        self.probe = probe
        self.health = health
        self.manager_id = manager_id
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.status = status or RunStatus()
        self._clock = clock
        self._wall_clock = wall_clock or time.time
        self._on_probe = on_probe
        self._on_phase = on_phase
        self._port_owner = port_owner
        self._model_check = model_check
        self._reassign = reassign

    async def __call__(self, ctx: ChildContext) -> ExitReason:
        spec, ports = self.spec, self.ports
        argv = build_argv(self.launcher, spec, ports.port, ports.prometheus_port)
        env = build_env(self.base_env, spec, self.manager_id)
        if not self.status.start_requested:
            self.status.restarts += 1
        self.status.start_requested = False
        self.status.health_check_failures = 0
        try:
            process = await self.spawner.spawn(argv, env)
        except OSError as exc:
            detail = f"cannot start {argv[0]!r}: {exc}"
            self.status.last_exit = InstanceExit(ExitCause.SPAWN_FAILED, detail)
            self.status.last_error = detail
            self.status.exited_at = self._wall_clock()
            raise RuntimeError(detail) from exc
        self.status.pid = process.pid
        ctx.report_pid(process.pid)
        self.status.spawned_at = self._clock()
        self._enter(Phase.SPAWNED)
        self._log(logging.INFO, "spawned", "started pid %d: %s", process.pid, " ".join(argv))
        exit: InstanceExit | None = None
        try:
            exit = await self._supervise(ctx, process)
            if exit.cause is ExitCause.PORT_TAKEN:
                exit = self._move_port(exit)
            return exit.reason()
        except Exception as exc:
            exit = InstanceExit(ExitCause.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._make_sure_it_is_gone(process)
            self.status.pid = None
            self.status.phase = None
            self.status.progress = None
            self.status.exited_at = self._wall_clock()
            self.status.last_exit = exit or InstanceExit(ExitCause.CANCELLED, "cancelled")
            if exit is not None and exit.cause.failed:
                self.status.last_error = exit.error or exit.detail

    def _log(self, level: int, event: str, message: str, *args: object) -> None:
        """A log record about this instance, with its fields for structured logs."""
        fields: dict[str, object] = {
            "event": event,
            "instance": self.spec.name,
            "model_id": self.spec.model_id,
        }
        if self.status.pid is not None:
            fields["pid"] = self.status.pid
        logger.log(level, "instance %s: " + message, self.spec.name, *args, extra=fields)

    def _enter(self, phase: Phase, progress: float | None = None) -> None:
        status = self.status
        status.phase, status.progress = phase, progress
        if self._on_phase is not None:
            self._on_phase(self.spec.name, phase)

    def _on_startup_line(self, line: LogLine) -> None:
        """Follow the start-up phases in the process's own lines, and tell the operator."""
        status = self.status
        if status.phase in (None, Phase.READY):
            return
        seen = classify_line(line.text, line.message)
        if seen is None or seen.phase is Phase.READY:
            return  # readiness is the health check's to declare
        said = line.message if line.message is not None else line.text
        if seen.phase is not status.phase:
            self._enter(seen.phase, seen.progress)
        elif seen.progress is not None:
            # A progress bar prints many lines: tell every tenth percent only.
            before = status.progress or 0.0
            status.progress = seen.progress
            if int(seen.progress // 10) == int(before // 10):
                return
        self._log(logging.INFO, seen.phase.value, "%s", said.strip())

    def _move_port(self, exit: InstanceExit) -> InstanceExit:
        """A fresh port for the next run, unless the user chose this one."""
        old = self.ports.port
        try:
            fresh = self._reassign() if self._reassign is not None else None
        except PortError as exc:
            detail = f"{exit.detail}; no other port is free: {exc}"
            self._log(logging.ERROR, "port_taken", "%s", detail)
            return msgspec.structs.replace(exit, detail=detail)
        if fresh is None:
            detail = (
                f"{exit.detail}; port {old} was set for this instance, so it is kept: "
                "free it, or give the instance another port"
            )
            self._log(logging.ERROR, "port_taken", "%s", detail)
            return msgspec.structs.replace(exit, detail=detail)
        self.ports = fresh
        detail = f"{exit.detail}; the next run gets port {fresh.port}"
        self._log(
            logging.WARNING,
            "port_moved",
            "port %d is taken by another process; moving to port %d",
            old,
            fresh.port,
        )
        return msgspec.structs.replace(exit, detail=detail)

    async def _supervise(self, ctx: ChildContext, process: subprocess.Popen[bytes]) -> InstanceExit:
        wake_send, wake = trio.open_memory_channel[Wake](math.inf)
        exited = trio.Event()
        returncode: int | None = None
        streams = []
        for pipe in (process.stdout, process.stderr):
            assert pipe is not None
            streams.append(trio.lowlevel.FdStream(os.dup(pipe.fileno())))
            pipe.close()

        def on_line(line: LogLine) -> None:
            if is_ready_line(line):
                wake_send.send_nowait(Wake.READY_LINE)
            else:
                self._on_startup_line(line)

        async def watch_exit() -> None:
            nonlocal returncode
            # Kill what is left of the group while the leader is still a zombie,
            # so its pid (the group id) cannot have been reused.
            returncode = await wait_for_exit(
                process, before_reap=lambda: kill_group(process.pid, signal.SIGKILL)
            )
            exited.set()
            wake_send.send_nowait(Wake.EXIT)

        async def watch_stop() -> None:
            await ctx.wait_stop_requested()
            wake_send.send_nowait(Wake.STOP)

        async with trio.open_nursery() as nursery:
            for stream, name in zip(streams, ("stdout", "stderr"), strict=True):
                nursery.start_soon(self._pump, stream, name, on_line)
            nursery.start_soon(watch_exit)
            nursery.start_soon(watch_stop)
            result = await self._lifetime(ctx, process, exited, wake)
            nursery.cancel_scope.cancel()
        if result is None:  # the process exited by itself
            assert returncode is not None
            return self._exited(returncode, process.pid)
        return result

    def _exited(self, returncode: int, pid: int) -> InstanceExit:
        exit = describe_exit(returncode, self.log)
        if exit.cause is not ExitCause.CRASHED:
            return exit
        port = self.ports.port
        # Our group is gone by now, so any listener on the port is a stranger's.
        stranger = self._port_owner(port, pid) is PortOwner.STRANGER
        if stranger or says_port_taken(last_words(self.log, 10)):
            return InstanceExit(
                ExitCause.PORT_TAKEN,
                f"port {port} is taken by another process ({exit.detail})",
                status=exit.status,
                port=port,
            )
        return exit

    async def _pump(
        self, stream: trio.lowlevel.FdStream, name: str, on_line: Callable[[LogLine], None]
    ) -> None:
        async with stream:
            await pump(stream, self.log, name, on_line=on_line)  # type: ignore[arg-type]

    async def _identify(self, pid: int, answered: bool) -> tuple[bool, str | None]:
        """Whether a stranger holds the port, and why the port is not ours (None if it is).

        ``answered``: whether the health probe just answered. A stranger
        listening on the port is reported whatever the probe said.
        """
        port = self.ports.port
        owner = self._port_owner(port, pid)
        if owner is PortOwner.STRANGER:
            return True, f"port {port} is held by another process, not by this instance"
        if not answered or owner is PortOwner.OURS:
            return False, None
        if owner is PortOwner.NOBODY:  # it closed between the probe and the look
            return False, f"nothing of this instance listens on port {port}"
        # UNKNOWN: the kernel's tables cannot be read; the server must say it
        # serves this instance's model.
        if self._model_check is None:
            return False, None
        served = await self._model_check(INSTANCE_HOST, port, self.health.timeout)
        if served is None:
            return False, f"the server on port {port} does not say which model it serves"
        if served != self.spec.model_id:
            return True, f"port {port} is held by another server (it serves {served!r})"
        return False, None

    async def _lifetime(
        self,
        ctx: ChildContext,
        process: subprocess.Popen[bytes],
        exited: trio.Event,
        wake: trio.MemoryReceiveChannel[Wake],
    ) -> InstanceExit | None:
        """Probe and wait until the run ends; None when the process exited."""
        spec = self.spec
        policy = HealthPolicy(
            self.health, startup_timeout=spec.startup_timeout_secs, started_at=self._clock()
        )
        next_probe = self._clock() + policy.next_probe_after()
        while True:
            reason = None
            with trio.move_on_at(next_probe):
                reason = await wake.receive()
            if exited.is_set():
                return None
            if _stopping(ctx):
                return await self._stop(process, exited)
            if reason is Wake.READY_LINE and policy.ready:
                continue  # a stray Ready line after readiness changes nothing
            began = time.perf_counter()
            error = await self.probe(INSTANCE_HOST, self.ports.port, self.health.timeout)
            if self._on_probe is not None:
                self._on_probe(spec.name, time.perf_counter() - began, error is None, policy.ready)
            if exited.is_set():
                return None
            if _stopping(ctx):  # asked to stop while the probe ran: that wins
                return await self._stop(process, exited)
            stranger, not_ours = await self._identify(process.pid, error is None)
            if exited.is_set():
                return None
            if stranger and not policy.ready:
                # It cannot bind a port someone else holds: no use waiting.
                assert not_ours is not None
                await self._kill(process, exited)
                return InstanceExit(ExitCause.PORT_TAKEN, not_ours, port=self.ports.port)
            error = error or not_ours
            now = self._clock()
            verdict = policy.on_probe(error is None, now, error or "")
            next_probe = now + policy.next_probe_after()
            if error is None:
                self.status.health_check_failures = 0
                self.status.last_health_check = self._wall_clock()
            elif policy.ready:
                # Failed polls before readiness are the normal wait, no error.
                self.status.health_check_failures = policy.consecutive_failures
                self.status.last_error = error
            if verdict is Verdict.READY:
                self.status.last_error = ""
                took = now - self.status.spawned_at
                self._enter(Phase.READY)
                self._log(
                    logging.INFO, "ready", "ready on port %d after %.1fs", self.ports.port, took
                )
                ctx.started(pid=process.pid)
            elif verdict is Verdict.HEALTHY:
                self.status.last_error = ""
                ctx.report_health(True, "health check answered")
            elif verdict is Verdict.DEGRADED:
                ctx.report_health(
                    False, f"health check failed ({policy.consecutive_failures}): {error}"
                )
            elif verdict is Verdict.RESTART:
                await self._kill(process, exited)
                return InstanceExit(
                    ExitCause.UNHEALTHY,
                    f"unhealthy: {policy.consecutive_failures} consecutive health checks "
                    f"failed; last: {error}",
                )
            elif verdict is Verdict.STARTUP_TIMEOUT:
                await self._kill(process, exited)
                phase = self.status.phase.value if self.status.phase else "starting"
                return InstanceExit(
                    ExitCause.STARTUP_TIMEOUT,
                    f"not ready within {spec.startup_timeout_secs:g}s, still {phase} "
                    f"(last probe: {error})",
                )

    async def _stop(self, process: subprocess.Popen[bytes], exited: trio.Event) -> InstanceExit:
        kill_group(process.pid, signal.SIGTERM)
        # A stopped (SIGSTOP) process acts on SIGTERM only once continued.
        kill_group(process.pid, signal.SIGCONT)
        with trio.move_on_after(self.spec.stop_grace_secs):
            await exited.wait()
        if exited.is_set():
            return InstanceExit(ExitCause.STOPPED, "stopped")
        self._log(
            logging.WARNING,
            "kill",
            "no exit %gs after SIGTERM; sending SIGKILL",
            self.spec.stop_grace_secs,
        )
        await self._kill(process, exited)
        return InstanceExit(ExitCause.STOPPED, f"killed after {self.spec.stop_grace_secs:g}s grace")

    async def _kill(self, process: subprocess.Popen[bytes], exited: trio.Event) -> None:
        kill_tree(process.pid)
        await exited.wait()

    async def _make_sure_it_is_gone(self, process: subprocess.Popen[bytes]) -> None:
        # returncode is set only once reaped, and watch_exit kills the group
        # before reaping; an unreaped leader still holds the group id.
        if process.returncode is None:
            kill_tree(process.pid)
            with trio.move_on_after(10):
                await wait_for_exit(process)
