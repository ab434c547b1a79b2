"""Restart policy as pure data: no I/O, no clock of its own.

Every function and object here takes the current time as an argument (monotonic
seconds, as ``trio.current_time()`` gives them), so the supervisor runtime, the
instance layer and the tests all drive the same logic; the tests drive it in
virtual time.

The vocabulary is Erlang/OTP's, with two additions OTP leaves out because its
children restart in microseconds while a TEI process needs tens of seconds:

* a capped exponential **backoff** between restarts of one child (Kubernetes'
  CrashLoopBackOff shape), reset after a sustained healthy run;
* an optional **per-child intensity**: past it the child gives up and sits in
  ``failed`` (supervisord's FATAL) instead of taking its siblings down.

The supervisor-wide intensity, whose excess makes the supervisor stop its
children and escalate to its parent, is OTP's and uses the same `RestartWindow`.
"""

from __future__ import annotations

import enum
import math
from collections import deque

import msgspec

__all__ = [
    "Backoff",
    "ExitKind",
    "ExitReason",
    "GiveUp",
    "Intensity",
    "NoRestart",
    "Restart",
    "RestartDecision",
    "RestartTracker",
    "RestartType",
    "RestartWindow",
    "should_restart",
]


class RestartType(enum.Enum):
    """When a child that exited on its own is restarted (OTP's ``restart``)."""

    #: Always restarted.
    PERMANENT = "permanent"
    #: Restarted only after an abnormal exit (not ``normal``, not ``shutdown``).
    TRANSIENT = "transient"
    #: Never restarted, not even when a sibling's failure restarts the group;
    #: its spec is dropped once it has exited.
    TEMPORARY = "temporary"


class ExitKind(enum.Enum):
    """OTP's three classes of exit reason."""

    #: The child finished its work (a worker that returned; a process exit 0).
    NORMAL = "normal"
    #: The child was asked to stop, or stopped itself with a shutdown reason.
    SHUTDOWN = "shutdown"
    #: Anything else: an exception, a non-zero exit code, a signal.
    ABNORMAL = "abnormal"


class ExitReason(msgspec.Struct, frozen=True):
    """Why a child stopped running: its kind, and a human-readable detail."""

    kind: ExitKind
    detail: str = ""

    @classmethod
    def normal(cls, detail: str = "") -> ExitReason:
        return cls(ExitKind.NORMAL, detail)

    @classmethod
    def shutdown(cls, detail: str = "") -> ExitReason:
        return cls(ExitKind.SHUTDOWN, detail)

    @classmethod
    def abnormal(cls, detail: str) -> ExitReason:
        return cls(ExitKind.ABNORMAL, detail)

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


def should_restart(restart: RestartType, exit_kind: ExitKind) -> bool:
    """OTP's restart rule for a child that exited by itself."""
    if restart is RestartType.PERMANENT:
        return True
    if restart is RestartType.TRANSIENT:
        return exit_kind is ExitKind.ABNORMAL
    return False


class Intensity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most ``max_restarts`` restarts within any ``period`` seconds.

    OTP's ``intensity``/``period``: the restart that makes the count within the
    window exceed ``max_restarts`` is refused. ``Intensity(0, p)`` allows none.
    """

    max_restarts: int = 3
    period: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        if not self.period > 0 or not math.isfinite(self.period):
            raise ValueError(f"period must be a positive number of seconds, got {self.period!r}")


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capped exponential delay before each restart of one child.

    The n-th consecutive restart (counting from 0) waits
    ``min(initial * factor**n, maximum)`` seconds. A child that ran for at least
    ``reset_after`` seconds before exiting starts again from ``initial``.
    ``Backoff(initial=0)`` restarts immediately every time, as OTP does.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    reset_after: float = 120.0

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "reset_after"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.factor >= 1 or not math.isfinite(self.factor):
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        if self.maximum < self.initial:
            raise ValueError(
                f"maximum ({self.maximum!r}) must not be below initial ({self.initial!r})"
            )

    def delay(self, attempt: int) -> float:
        """The delay before restart number ``attempt`` (0-based) of a streak."""
        if self.initial == 0:
            return 0.0
        # Compare exponents instead of computing factor**attempt, which overflows.
        if self.factor > 1 and attempt >= math.log(self.maximum / self.initial, self.factor):
            return self.maximum
        return min(self.initial * self.factor**attempt, self.maximum)


class RestartWindow:
    """A sliding window of restart times, OTP's ``add_restart``.

    Times older than ``now - period`` fall out; `record` adds ``now`` and says
    whether the count is still within ``max_restarts``.
    """

    def __init__(self, intensity: Intensity) -> None:
        self.intensity = intensity
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        threshold = now - self.intensity.period
        while self._times and self._times[0] < threshold:
            self._times.popleft()

    def record(self, now: float) -> bool:
        """Count a restart at ``now``; False when that exceeds the intensity."""
        self._expire(now)
        self._times.append(now)
        return len(self._times) <= self.intensity.max_restarts

    def count(self, now: float) -> int:
        """Restarts within the window ending at ``now``."""
        self._expire(now)
        return len(self._times)

    def reset(self) -> None:
        self._times.clear()


class Restart(msgspec.Struct, frozen=True):
    """Restart after ``delay`` seconds, at monotonic time ``at``."""

    delay: float
    at: float


class NoRestart(msgspec.Struct, frozen=True):
    """The restart type says this exit is final."""

    reason: str


class GiveUp(msgspec.Struct, frozen=True):
    """The child's own intensity is exceeded: stop trying until told to start."""

    restarts: int
    period: float


RestartDecision = Restart | NoRestart | GiveUp


class RestartTracker:
    """One child's restart history and the decision on each of its exits.

    It owns the child's backoff streak and its restart window. ``intensity``
    is the child's own limit (None: no limit of its own, as in OTP, where only
    the supervisor counts); ``window_period`` sizes the window that
    introspection reports when the child has no intensity of its own.
    """

    def __init__(
        self,
        restart: RestartType,
        backoff: Backoff,
        intensity: Intensity | None = None,
        *,
        window_period: float = 5.0,
    ) -> None:
        self.restart = restart
        self.backoff = backoff
        self.intensity = intensity
        # With no limit of its own the window only counts, so it never refuses.
        window = intensity or Intensity(max_restarts=2**62, period=window_period)
        self._window = RestartWindow(window)
        self._streak = 0

    @property
    def streak(self) -> int:
        """Consecutive restarts since the last reset (drives the backoff)."""
        return self._streak

    def restarts_in_window(self, now: float) -> int:
        return self._window.count(now)

    def decide(self, exit: ExitReason, *, now: float, ran_for: float) -> RestartDecision:
        """Decide what follows an exit the child made by itself.

        ``ran_for`` is how long the child had been running when it exited; a run
        of at least ``backoff.reset_after`` seconds ends the backoff streak.
        """
        if not should_restart(self.restart, exit.kind):
            return NoRestart(f"{self.restart.value} child exited ({exit})")
        if ran_for >= self.backoff.reset_after:
            self._streak = 0
        if not self._window.record(now):
            limit = self._window.intensity
            return GiveUp(restarts=self._window.count(now), period=limit.period)
        delay = self.backoff.delay(self._streak)
        self._streak += 1
        return Restart(delay=delay, at=now + delay)

    def reset(self) -> None:
        """Forget the history: an explicit start by a person or an API call."""
        self._window.reset()
        self._streak = 0
