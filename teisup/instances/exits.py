"""Why one run of an instance ended, as data: `InstanceExit` and its `ExitCause`.

The runner decides the cause where it knows it (an exit status, a signal, a
health verdict, a stop request, a stranger on the port); metrics and the API
read the cause, never the prose. `InstanceExit.reason` is the supervision
core's `ExitReason` for the same run, with the sentence users see in logs,
events and ``last_exit``.
"""

from __future__ import annotations

import enum
import signal

import msgspec

from ..supervision import ExitKind, ExitReason

__all__ = ["ExitCause", "InstanceExit", "signal_name"]


class ExitCause(enum.Enum):
    """What ended a run."""

    #: The process exited by itself with status 0.
    EXITED = "exited"
    #: The process exited by itself with a non-zero status.
    CRASHED = "crashed"
    #: The process exited by itself with an error it says retrying cannot
    #: fix (a model not available offline, a bad flag): not restarted.
    PERMANENT_ERROR = "permanent_error"
    #: The process was killed by a signal nobody in teisup sent.
    KILLED = "killed"
    #: Too many consecutive failed health checks once ready: killed.
    UNHEALTHY = "unhealthy"
    #: Not ready within its start-up budget: killed.
    STARTUP_TIMEOUT = "startup_timeout"
    #: Its port is taken by another process (seen listening there, or the
    #: process failed to bind it): killed or exited.
    PORT_TAKEN = "port_taken"
    #: Stopped on request (SIGTERM, and SIGKILL after the grace if need be).
    STOPPED = "stopped"
    #: The runner was cancelled (its supervisor went away): the group was killed.
    CANCELLED = "cancelled"
    #: The router could not be executed at all.
    SPAWN_FAILED = "spawn_failed"
    #: The runner itself failed (a bug): the group was killed.
    ERROR = "error"

    @property
    def failed(self) -> bool:
        """Whether a run that ended so went wrong (not an exit 0, a stop or a cancel)."""
        return self not in (ExitCause.EXITED, ExitCause.STOPPED, ExitCause.CANCELLED)


_KINDS = {
    ExitCause.EXITED: ExitKind.NORMAL,
    ExitCause.STOPPED: ExitKind.SHUTDOWN,
    ExitCause.CANCELLED: ExitKind.SHUTDOWN,
}


class InstanceExit(msgspec.Struct, frozen=True):
    """How one run ended: the cause, its facts, and the sentence for people."""

    cause: ExitCause
    detail: str
    #: The exit status of a process that exited by itself.
    status: int | None = None
    #: The signal that killed it (`ExitCause.KILLED`).
    signal: int | None = None
    #: The port it could not have (`ExitCause.PORT_TAKEN`).
    port: int | None = None
    #: The process's own error line, when it printed one (see
    #: `teisup.instances.startup.summarize_error`).
    error: str = ""

    @classmethod
    def of_returncode(cls, returncode: int, error: str = "") -> InstanceExit:
        """The exit of a process that ended by itself (``Popen.returncode``),
        with the line it died of."""
        if returncode == 0:
            return cls(ExitCause.EXITED, "exited with code 0", status=0)
        if returncode < 0:
            name = signal_name(-returncode)
            return cls(
                ExitCause.KILLED, _with(f"killed by {name}", error), signal=-returncode, error=error
            )
        return cls(
            ExitCause.CRASHED,
            _with(f"exited with code {returncode}", error),
            status=returncode,
            error=error,
        )

    @property
    def kind(self) -> ExitKind:
        """The supervision core's class of this exit."""
        return _KINDS.get(self.cause, ExitKind.ABNORMAL)

    def reason(self) -> ExitReason:
        """The `ExitReason` the supervisor records for this run."""
        return ExitReason(self.kind, self.detail, permanent=self.cause is ExitCause.PERMANENT_ERROR)


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for a number without a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _with(what: str, error: str) -> str:
    return f"{what}: {error}" if error else what
