"""One supervised child at run time: its record, its runs, the task of each run.

A `Child` is a supervisor's record of one child across its runs; a `Run` is
one run of it: one task in the supervisor's nursery, under a cancel scope of
its own. The task (`run_child`) decides nothing: it runs the worker (or the
sub-supervisor) and reports what happened, as an `Exited`, `Ready` or
`Health` message, through the ``post`` callable its supervisor gave it. The
`ChildContext` is the worker's side of the same run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .errors import RestartIntensityExceeded
from .events import TransitionBus
from .lifecycle import ChildState, Lifecycle
from .policy import ExitReason, RestartTracker
from .specs import ChildSpec

__all__ = ["Child", "ChildContext", "ChildEvent", "Exited", "Health", "Ready", "Run", "run_child"]

logger = logging.getLogger("teisup.supervision")


class Run:
    """One run of one child: its task's scope and the events around it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.settled = trio.Event()  # reported ready, or finished
        self.finished = trio.Event()
        self.task: trio.lowlevel.Task | None = None
        self.ready = False
        self.stopping = False  # the supervisor is stopping it: its exit is not a decision
        self.killed = False
        #: When a stop request turns into cancellation (its shutdown grace ends).
        self.kill_at = math.inf
        self.pid: int | None = None
        self.exit: ExitReason | None = None


class Child:
    """A supervisor's record of one child across its runs."""

    def __init__(self, spec: ChildSpec, window_period: float) -> None:
        self.spec = spec
        self.lifecycle = Lifecycle()
        self.tracker = RestartTracker(
            spec.restart, spec.backoff, spec.intensity, window_period=window_period
        )
        self.run: Run | None = None
        self.ready_at: float | None = None
        self.next_restart_at: float | None = None
        self.last_exit: ExitReason | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def state(self) -> ChildState:
        return self.lifecycle.state

    @property
    def pid(self) -> int | None:
        """The OS process of the current run, while it is active."""
        return self.run.pid if self.run and self.lifecycle.active else None


# What a run reports to its supervisor's main loop.


@dataclass(slots=True)
class Exited:
    child: Child
    run: Run
    exit: ExitReason


@dataclass(slots=True)
class Ready:
    child: Child
    run: Run


@dataclass(slots=True)
class Health:
    child: Child
    run: Run
    healthy: bool
    reason: str


ChildEvent = Exited | Ready | Health


class ChildContext:
    """What a worker gets each time it starts: its identity, its stop request,
    and the calls through which it reports readiness and health.

    A worker calls `started` once it is ready. With the spec's ``await_ready``
    (the default) the supervisor waits for that before it goes on, so such a
    worker must not call its own supervisor's methods before `started`: the
    supervisor would be waiting for it (OTP has the same rule for ``init``).
    It should watch `wait_stop_requested` and return promptly when it fires; if
    it does not return within its shutdown spec it is cancelled.
    """

    def __init__(
        self,
        post: Callable[[ChildEvent], None],
        bus: TransitionBus,
        child: Child,
        run: Run,
        path: tuple[str, ...],
    ) -> None:
        self._post = post
        self._bus = bus
        self._child = child
        self._run = run
        self._path = path

    @property
    def id(self) -> str:
        return self._path[-1]

    @property
    def path(self) -> tuple[str, ...]:
        """The child's ids from the root supervisor down."""
        return self._path

    @property
    def bus(self) -> TransitionBus:
        """The tree's transition bus (sub-supervisors publish to it)."""
        return self._bus

    def started(self, *, pid: int | None = None) -> None:
        """Report ready (and, for an OS process, its pid). Only the first call counts."""
        if self._run.ready or self._run.settled.is_set():
            return
        if pid is not None:
            self._run.pid = pid
        self._run.ready = True
        self._run.settled.set()
        if not self._child.spec.await_ready:
            self._post(Ready(self._child, self._run))

    def report_pid(self, pid: int | None) -> None:
        """Record the OS process this child currently runs, for introspection."""
        self._run.pid = pid

    def report_health(self, healthy: bool, reason: str = "") -> None:
        """Move a ready child between ``running`` and ``unhealthy``.

        Reporting the state it is already in does nothing; reports before ready
        are ignored (start-up is the worker's own business).
        """
        self._post(Health(self._child, self._run, healthy, reason))

    @property
    def stop_requested(self) -> bool:
        return self._run.stop_requested.is_set()

    async def wait_stop_requested(self) -> None:
        """Return once the supervisor asks this child to stop."""
        await self._run.stop_requested.wait()


def describe(exc: BaseException) -> str:
    """An exception as one line: its type, and its message if it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_child(
    child: Child, run: Run, ctx: ChildContext, post: Callable[[ChildEvent], None]
) -> None:
    """The task of one run: run the worker or sub-supervisor, then report its exit.

    An exit before ready under ``await_ready`` is not posted: the supervisor is
    waiting on ``run.settled`` and handles it itself. Nor is the exit of a run
    the supervisor is stopping, which is no decision.
    """
    from .supervisor import Supervisor  # the runtime of a sub-tree is a supervisor's

    run.task = trio.lowlevel.current_task()
    exit: ExitReason | None = None
    try:
        with run.scope:
            target = child.spec.start
            if isinstance(target, Supervisor):
                try:
                    await target._serve(ctx, trio.TASK_STATUS_IGNORED)
                except RestartIntensityExceeded as exc:
                    # OTP: a supervisor that gives up exits with reason shutdown.
                    exit = ExitReason.shutdown(describe(exc))
                result: Any = None
            else:
                result = await target(ctx)
            if exit is None:
                exit = result if isinstance(result, ExitReason) else ExitReason.normal()
        if exit is None:  # our own scope cancelled it: only a stop does that
            exit = ExitReason.shutdown("killed")
    except Exception as exc:
        exit = ExitReason.abnormal(describe(exc))
        if not run.stopping:
            logger.error("%s crashed", "/".join(ctx.path), exc_info=exc)
    finally:
        run.exit = exit or ExitReason.shutdown("cancelled")
        run.finished.set()
        run.settled.set()
    if (run.ready or not child.spec.await_ready) and not run.stopping:
        post(Exited(child, run, run.exit))
