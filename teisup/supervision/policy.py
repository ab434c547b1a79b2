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
Which siblings a restart takes along (the strategy) is `plan_restart`.

Numbers here come from users (an instance's restart policy), so no
computation on them may raise: a value the constructors accept always yields
a finite, non-negative delay.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from .lifecycle import ChildState

__all__ = [
    "Backoff",
    "ExitKind",
    "ExitReason",
    "GiveUp",
    "GroupMember",
    "Intensity",
    "NoRestart",
    "Restart",
    "RestartDecision",
    "RestartPlan",
    "RestartTracker",
    "RestartType",
    "RestartWindow",
    "Strategy",
    "plan_restart",
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
    #: The child itself says running it again cannot help (a model that is
    #: not on the machine, a bad flag): no restart, whatever its type allows.
    permanent: bool = False

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


class Strategy(enum.Enum):
    """What a supervisor does to a child's siblings when it restarts the child."""

    #: Restart only the child that exited.
    ONE_FOR_ONE = "one_for_one"
    #: Stop all other children, then restart them all.
    ONE_FOR_ALL = "one_for_all"
    #: Stop the children started after it, then restart it and them.
    REST_FOR_ONE = "rest_for_one"


class Intensity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most ``max_restarts`` restarts within any ``period`` seconds.

    OTP's ``intensity``/``period``: the restart that makes the count within the
    window exceed ``max_restarts`` is refused. ``Intensity(0, p)`` allows none.
    """

    max_restarts: int = 3
    period: float = 5.0

    def __post_init__(self) -> None:
        count = self.max_restarts
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {count!r}")
        if not _finite("period", self.period) > 0:
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
            value = _finite(name, getattr(self, name))
            if not value >= 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _finite("factor", self.factor) >= 1:
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        if float(self.maximum) < float(self.initial):
            raise ValueError(
                f"maximum ({self.maximum!r}) must not be below initial ({self.initial!r})"
            )

    def delay(self, attempt: int) -> float:
        """The delay before restart number ``attempt`` (0-based) of a streak.

        Never raises: always a finite number between 0 and ``maximum``, for
        any values the constructor accepts and any streak length.
        """
        initial, factor, maximum = float(self.initial), float(self.factor), float(self.maximum)
        if initial == 0 or attempt <= 0 or factor == 1:
            return min(initial, maximum)
        # Compare exponents in log space, so that neither factor**attempt nor
        # maximum/initial is ever computed where it would overflow (a huge
        # factor, a subnormal initial, a streak of millions). The bound is a
        # finite float: both logarithms are finite and log(factor) > 0.
        if attempt >= (math.log(maximum) - math.log(initial)) / math.log(factor):
            return maximum
        try:
            delay = initial * factor**attempt
        except OverflowError:  # rounding at the bound: the cap applies
            return maximum
        return min(delay, maximum) if math.isfinite(delay) else maximum


def _finite(name: str, value: object) -> float:
    """``value`` as a finite float, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


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
        """Count a restart at ``now``; False when that exceeds the intensity.

        A refused restart is not kept: the count is always of restarts that
        happened, so "gave up after N restarts" and the count agree.
        """
        self._expire(now)
        if len(self._times) >= self.intensity.max_restarts:
            return False
        self._times.append(now)
        return True

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
    """The child's own intensity is exceeded, or its exit says retrying cannot
    help (``permanent``): stop trying until told to start."""

    restarts: int
    period: float
    permanent: bool = False


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
        if exit.permanent:
            period = self._window.intensity.period
            return GiveUp(restarts=self._window.count(now), period=period, permanent=True)
        if ran_for >= self.backoff.reset_after:
            self._streak = 0
        if not self._window.record(now):
            limit = self._window.intensity
            return GiveUp(restarts=self._window.count(now), period=limit.period)
        delay = self.backoff.delay(self._streak)
        # A Backoff subclass could answer anything; a bad delay must not reach
        # the supervisor's clock (trio refuses a NaN deadline).
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay < math.inf
        ):
            raise ValueError(f"backoff gave an invalid delay {delay!r} for restart {self._streak}")
        self._streak += 1
        return Restart(delay=delay, at=now + delay)

    def reset(self) -> None:
        """Forget the history: an explicit start by a person or an API call."""
        self._window.reset()
        self._streak = 0


class GroupMember(NamedTuple):
    """What `plan_restart` needs to know of one child of a supervisor."""

    id: str
    restart: RestartType
    state: ChildState


class RestartPlan(msgspec.Struct, frozen=True):
    """What a supervisor does about one child's own exit, sibling by sibling.

    ``restart``: the exited child is to be restarted (its restart type allows
    it; its tracker then decides when, or that it gives up). The rest applies
    only when it is: ``stop`` names the siblings to stop, in that order
    (reverse start order); ``schedule`` the siblings that restart with it, in
    start order. ``drop`` names the children whose specs are forgotten once
    stopped: temporary siblings of the group, or the exited child itself when
    it is temporary.
    """

    restart: bool
    stop: tuple[str, ...] = ()
    schedule: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


#: Sibling states a group restart has to stop first: running, or about to be.
_STOPPABLE = frozenset(
    {ChildState.STARTING, ChildState.RUNNING, ChildState.UNHEALTHY, ChildState.BACKOFF}
)


def plan_restart(
    strategy: Strategy, children: Sequence[GroupMember], exited: int, exit_kind: ExitKind
) -> RestartPlan:
    """The restart group when ``children[exited]`` exits by itself with ``exit_kind``.

    ``children`` are all the supervisor's children in start order. OTP's
    rules: ``one_for_one`` touches no sibling, ``one_for_all`` takes every
    other child along, ``rest_for_one`` those started after it. Siblings of the
    group are stopped in reverse start order; every non-temporary one is then
    restarted, including ones that had stopped, except those in ``failed``,
    which stay failed; temporary ones are dropped.
    """
    child = children[exited]
    if not should_restart(child.restart, exit_kind):
        dropped = (child.id,) if child.restart is RestartType.TEMPORARY else ()
        return RestartPlan(restart=False, drop=dropped)
    if strategy is Strategy.ONE_FOR_ALL:
        group = [c for i, c in enumerate(children) if i != exited]
    elif strategy is Strategy.REST_FOR_ONE:
        group = list(children[exited + 1 :])
    else:
        group = []
    return RestartPlan(
        restart=True,
        stop=tuple(c.id for c in reversed(group) if c.state in _STOPPABLE),
        schedule=tuple(
            c.id
            for c in group
            if c.restart is not RestartType.TEMPORARY and c.state is not ChildState.FAILED
        ),
        drop=tuple(c.id for c in group if c.restart is RestartType.TEMPORARY),
    )
