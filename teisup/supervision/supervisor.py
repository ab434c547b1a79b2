"""The supervisor runtime: a thin Trio shell around the pure policy.

Theory of operation
-------------------
A `Supervisor` owns one nursery. Each run of each child is one task in it,
wrapped in a cancel scope of its own (a `_Run`). The task never decides
anything: when the child exits it records the `ExitReason` and posts it to the
supervisor's inbox.

Every decision and every state change happens with the supervisor's lock held,
either in the main loop (exits, due restarts, the stop request) or in a public
method (`start_child`, `terminate_child`, ...). So decisions are serial, as in
OTP's single supervisor process, and the tasks that only report exits never
take the lock: a lock holder waiting for a child to finish cannot deadlock.

Stopping a child follows its shutdown spec: ``brutal_kill`` cancels its scope;
a number of seconds sets its stop request (`ChildContext.wait_stop_requested`),
waits that long for it to return, then cancels its scope; ``infinity`` sets the
stop request and waits. A worker that owns an OS process maps the request to
SIGTERM and cancellation to SIGKILL.

Backoff never blocks the loop: a child waiting to restart is in ``backoff``
with a due time, and the loop wakes at the earliest one.

All times come from ``trio.current_time()``: monotonic, and virtual under
``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .errors import (
    ChildRunningError,
    ChildStartError,
    DuplicateChildError,
    MaxChildrenError,
    RestartIntensityExceeded,
    SupervisionError,
    SupervisorNotRunning,
    SupervisorStartError,
    UnknownChildError,
)
from .events import TransitionBus, TransitionEvent
from .introspection import (
    ChildCounts,
    ChildInfo,
    SupervisorPhase,
    SupervisorStatistics,
    TreeNode,
)
from .lifecycle import ChildState, Lifecycle, Trigger
from .policy import (
    ExitKind,
    ExitReason,
    GiveUp,
    Intensity,
    NoRestart,
    RestartTracker,
    RestartType,
    RestartWindow,
)
from .specs import BRUTAL_KILL, INFINITY, ChildKind, ChildSpec, Strategy, validate_id

__all__ = ["ChildContext", "Supervisor"]

logger = logging.getLogger("teisup.supervision")

#: Elixir's default: 3 restarts within 5 s (Erlang's is 1 within 5 s).
DEFAULT_INTENSITY = Intensity(max_restarts=3, period=5.0)


class _Run:
    """One run of one child: its task's scope and the events around it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.settled = trio.Event()  # reported ready, or finished
        self.finished = trio.Event()
        self.ready = False
        self.stopping = False  # the supervisor is stopping it: exits are not decisions
        self.killed = False
        self.pid: int | None = None
        self.exit: ExitReason | None = None


class _Child:
    """A supervisor's record of one child across its runs."""

    def __init__(self, spec: ChildSpec, window_period: float) -> None:
        self.spec = spec
        self.lifecycle = Lifecycle()
        self.tracker = RestartTracker(
            spec.restart, spec.backoff, spec.intensity, window_period=window_period
        )
        self.run: _Run | None = None
        self.ready_at: float | None = None
        self.next_restart_at: float | None = None
        self.last_exit: ExitReason | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def state(self) -> ChildState:
        return self.lifecycle.state


@dataclass(slots=True)
class _Exited:
    child: _Child
    run: _Run
    exit: ExitReason


@dataclass(slots=True)
class _Wake:
    pass


class ChildContext:
    """What a worker gets each time it starts: its identity and its stop request.

    A worker must call `started` once it is ready; the supervisor starts the
    next child only then (OTP's synchronous start). It should watch
    `wait_stop_requested` and return promptly when it fires; if it does not
    return within its shutdown spec it is cancelled.
    """

    def __init__(self, path: tuple[str, ...], run: _Run, bus: TransitionBus) -> None:
        self._path = path
        self._run = run
        self._bus = bus

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
        """Report ready (and, for an OS process, its pid). Later calls are ignored."""
        if pid is not None:
            self._run.pid = pid
        if not self._run.ready and not self._run.settled.is_set():
            self._run.ready = True
            self._run.settled.set()

    def report_pid(self, pid: int | None) -> None:
        """Record the OS process this child currently runs, for introspection."""
        self._run.pid = pid

    @property
    def stop_requested(self) -> bool:
        return self._run.stop_requested.is_set()

    async def wait_stop_requested(self) -> None:
        """Return once the supervisor asks this child to stop."""
        await self._run.stop_requested.wait()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    """An Erlang/OTP-style supervisor of Trio workers and sub-supervisors.

    ::

        root = Supervisor("root", [ChildSpec("api", serve_api)], strategy=Strategy.ONE_FOR_ONE)
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            ...
            await root.stop()

    ``intensity`` (default: 3 restarts within 5 s) is the supervisor's own
    limit: past it, it stops every child in reverse start order and `run`
    raises `RestartIntensityExceeded`, which its parent sees as a crash.
    ``None`` means no limit. ``max_children`` caps the number of children
    (static and dynamic).

    A supervisor can run again after it stopped (its parent restarts it that
    way); each run starts from the children given here. Children added with
    `start_child` are lost then, as in OTP.
    """

    def __init__(
        self,
        id: str,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: Intensity | None = DEFAULT_INTENSITY,
        max_children: int | None = None,
    ) -> None:
        self.id = validate_id(id)
        self.strategy = Strategy(strategy)
        self.intensity = intensity
        if max_children is not None and max_children < 0:
            raise ValueError(f"max_children must be >= 0, got {max_children!r}")
        self.max_children = max_children
        self._initial: tuple[ChildSpec, ...] = tuple(children)
        self._check_ids(self._initial)
        if max_children is not None and len(self._initial) > max_children:
            raise MaxChildrenError(
                f"supervisor {id!r}: {len(self._initial)} children exceed max_children="
                f"{max_children}"
            )
        self._own_bus = TransitionBus()
        self._bus = self._own_bus
        self._path: tuple[str, ...] = (id,)
        self._phase = SupervisorPhase.IDLE
        self._lock = trio.StrictFIFOLock()
        self._children: list[_Child] = []
        self._window: RestartWindow | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested = False
        self._done = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Exited | _Wake](math.inf)

    @staticmethod
    def _check_ids(specs: Sequence[ChildSpec]) -> None:
        seen: set[str] = set()
        for spec in specs:
            if spec.id in seen:
                raise DuplicateChildError(f"duplicate child id {spec.id!r}")
            seen.add(spec.id)

    def __repr__(self) -> str:
        return f"<Supervisor {'/'.join(self._path)} {self._phase.value}>"

    # -- running ---------------------------------------------------------------

    @property
    def events(self) -> TransitionBus:
        """The transition bus of the tree this supervisor belongs to."""
        return self._bus

    @property
    def phase(self) -> SupervisorPhase:
        return self._phase

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report started, supervise until `stop`.

        Raises `SupervisorStartError` if a child fails to start (the ones
        already started are stopped first) and `RestartIntensityExceeded` when
        the intensity is exceeded.
        """
        await self._serve(None, task_status)

    async def stop(self) -> None:
        """Stop every child in reverse start order, then return once `run` has."""
        if self._phase in (SupervisorPhase.STARTING, SupervisorPhase.RUNNING):
            self._request_stop()
        if self._phase is not SupervisorPhase.IDLE:
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Return once the current run is over (stopped or failed)."""
        await self._done.wait()

    def _request_stop(self) -> None:
        self._stop_requested = True
        self._inbox_send.send_nowait(_Wake())

    async def _serve(self, ctx: ChildContext | None, task_status: trio.TaskStatus[None]) -> None:
        if self._phase in (
            SupervisorPhase.STARTING,
            SupervisorPhase.RUNNING,
            SupervisorPhase.STOPPING,
        ):
            raise RuntimeError(f"supervisor {self.id!r} is already running")
        if ctx is None:
            self._bus, self._path = self._own_bus, (self.id,)
        else:
            self._bus, self._path = ctx.bus, ctx.path
        period = self.intensity.period if self.intensity else 5.0
        self._children = [_Child(spec, period) for spec in self._initial]
        self._window = RestartWindow(self.intensity) if self.intensity else None
        self._stop_requested = False
        self._done = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Exited | _Wake](math.inf)
        self._phase = SupervisorPhase.STARTING
        # Errors of our own are raised outside the nursery, so that callers see
        # them as they are rather than wrapped in an exception group.
        error: SupervisionError | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    async with self._lock:
                        await self._start_initial_children()
                    self._phase = SupervisorPhase.RUNNING
                    if ctx is not None:
                        nursery.start_soon(self._relay_stop_request, ctx)
                        ctx.started()
                    task_status.started()
                    await self._loop()
                except SupervisionError as exc:
                    error = exc
                # Only the relay can be left: every child is stopped by now.
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._abandon_all("supervisor cancelled")
            self._phase = SupervisorPhase.FAILED if error else SupervisorPhase.STOPPED
            self._done.set()
        if error is not None:
            raise error

    async def _relay_stop_request(self, ctx: ChildContext) -> None:
        await ctx.wait_stop_requested()
        self._request_stop()

    async def _start_initial_children(self) -> None:
        for child in list(self._children):
            exit = await self._launch(child, "supervisor starting")
            if exit is None:
                continue
            if exit.kind is ExitKind.ABNORMAL:
                self._settle_exit(child, exit, Trigger.EXITED, f"failed to start: {exit}")
                await self._stop_all("a sibling failed to start")
                raise SupervisorStartError(
                    f"supervisor {self._name}: child {child.id!r} failed to start: {exit}", exit
                )
            self._post_exit(child, exit)

    async def _loop(self) -> None:
        while True:
            due = min(
                (c.next_restart_at for c in self._children if c.next_restart_at is not None),
                default=math.inf,
            )
            message: _Exited | _Wake | None = None
            with trio.move_on_at(due):
                message = await self._inbox.receive()
            async with self._lock:
                if self._stop_requested:
                    self._phase = SupervisorPhase.STOPPING
                    await self._stop_all("supervisor stopping")
                    return
                if isinstance(message, _Exited):
                    await self._handle_exit(message)
                await self._restart_due()

    # -- the public child API ------------------------------------------------------

    def _require_running(self) -> None:
        if self._phase is not SupervisorPhase.RUNNING or self._stop_requested:
            raise SupervisorNotRunning(
                f"supervisor {self._name} is {self._phase.value}, not running"
            )

    def _get(self, child_id: str) -> _Child:
        for child in self._children:
            if child.id == child_id:
                return child
        raise UnknownChildError(f"supervisor {self._name} has no child {child_id!r}")

    async def start_child(self, spec: ChildSpec) -> ChildInfo:
        """Add a child at the end of the start order and start it.

        Raises `DuplicateChildError`, `MaxChildrenError`, or `ChildStartError`
        (the spec is then not kept) if it fails before reporting ready.
        """
        async with self._lock:
            self._require_running()
            if any(c.id == spec.id for c in self._children):
                raise DuplicateChildError(
                    f"supervisor {self._name} already has a child {spec.id!r}"
                )
            if self.max_children is not None and len(self._children) >= self.max_children:
                raise MaxChildrenError(
                    f"supervisor {self._name} already has {len(self._children)} children "
                    f"(max_children={self.max_children}); cannot add {spec.id!r}"
                )
            period = self.intensity.period if self.intensity else 5.0
            child = _Child(spec, period)
            self._children.append(child)
            exit = await self._launch(child, "added")
            if exit is not None:
                if exit.kind is ExitKind.ABNORMAL:
                    self._settle_exit(child, exit, Trigger.EXITED, f"failed to start: {exit}")
                    self._children.remove(child)
                    raise ChildStartError(
                        f"supervisor {self._name}: child {spec.id!r} failed to start: {exit}",
                        exit,
                    )
                self._post_exit(child, exit)
            return self._info(child)

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child within its shutdown spec; keep its spec (not a temporary's).

        A child waiting in backoff just stops waiting. Stopping a stopped child
        does nothing.
        """
        async with self._lock:
            self._require_running()
            child = self._get(child_id)
            await self._shutdown(child, "terminated on request")
            if child.spec.restart is RestartType.TEMPORARY:
                self._children.remove(child)

    async def restart_child(self, child_id: str) -> ChildInfo:
        """Start a child again from scratch, stopping it first if it runs.

        Its restart history (backoff streak, intensity window) is forgotten, so
        this is also how a ``failed`` child is brought back. Raises
        `ChildStartError` if it fails before reporting ready; it then stays
        stopped.
        """
        async with self._lock:
            self._require_running()
            child = self._get(child_id)
            await self._shutdown(child, "restart requested")
            child.tracker.reset()
            exit = await self._launch(child, "restart requested")
            if exit is not None:
                if exit.kind is ExitKind.ABNORMAL:
                    self._settle_exit(child, exit, Trigger.EXITED, f"failed to start: {exit}")
                    raise ChildStartError(
                        f"supervisor {self._name}: child {child_id!r} failed to start: {exit}",
                        exit,
                    )
                self._post_exit(child, exit)
            return self._info(child)

    async def delete_child(self, child_id: str) -> None:
        """Forget a child that is not running (terminate it first)."""
        async with self._lock:
            self._require_running()
            child = self._get(child_id)
            if child.state not in (ChildState.STOPPED, ChildState.FAILED):
                raise ChildRunningError(
                    f"supervisor {self._name}: child {child_id!r} is {child.state.value}; "
                    "terminate it before deleting it"
                )
            self._children.remove(child)

    # -- introspection -----------------------------------------------------------

    def which_children(self) -> list[ChildInfo]:
        """Every child in start order (OTP's ``which_children``)."""
        return [self._info(c) for c in self._children]

    def count_children(self) -> ChildCounts:
        """OTP's ``count_children``."""
        supervisors = sum(1 for c in self._children if c.spec.kind is ChildKind.SUPERVISOR)
        return ChildCounts(
            specs=len(self._children),
            active=sum(1 for c in self._children if c.lifecycle.active),
            supervisors=supervisors,
            workers=len(self._children) - supervisors,
        )

    def statistics(self) -> SupervisorStatistics:
        now = trio.current_time()
        return SupervisorStatistics(
            phase=self._phase,
            children=len(self._children),
            active=sum(1 for c in self._children if c.lifecycle.active),
            restarts_in_window=self._window.count(now) if self._window else 0,
            pending_restarts=sum(1 for c in self._children if c.state is ChildState.BACKOFF),
        )

    def snapshot(self) -> TreeNode:
        """The whole tree below this supervisor, recursively (call it inside Trio)."""
        now = trio.current_time()
        return TreeNode(
            id=self.id,
            kind=ChildKind.SUPERVISOR,
            state=self._phase.value,
            strategy=self.strategy,
            restarts_in_window=self._window.count(now) if self._window else 0,
            children=[self._node(c, now) for c in self._children],
        )

    def _info(self, child: _Child) -> ChildInfo:
        return ChildInfo(
            id=child.id,
            kind=child.spec.kind,
            restart=child.spec.restart,
            state=child.state,
            pid=child.run.pid if child.run and child.lifecycle.active else None,
        )

    def _node(self, child: _Child, now: float) -> TreeNode:
        sub = child.spec.start if isinstance(child.spec.start, Supervisor) else None
        due = child.next_restart_at if child.state is ChildState.BACKOFF else None
        return TreeNode(
            id=child.id,
            kind=child.spec.kind,
            state=child.state.value,
            restart=child.spec.restart,
            strategy=sub.strategy if sub else None,
            restarts_in_window=child.tracker.restarts_in_window(now),
            next_restart_at=due,
            next_restart_in=max(0.0, due - now) if due is not None else None,
            last_exit=child.last_exit,
            pid=child.run.pid if child.run and child.lifecycle.active else None,
            uptime=now - child.ready_at if child.ready_at is not None else None,
            children=sub.snapshot().children if sub else [],
        )

    # -- mechanics (the lock is held) -------------------------------------------

    @property
    def _name(self) -> str:
        return repr("/".join(self._path))

    def _fire(self, child: _Child, trigger: Trigger, reason: str) -> None:
        old, new = child.lifecycle.fire(trigger)
        path = (*self._path, child.id)
        logger.info("%s: %s -> %s (%s)", "/".join(path), old.value, new.value, reason)
        self._bus.publish(TransitionEvent(path, old, new, reason, trio.current_time()))

    def _settle_exit(self, child: _Child, exit: ExitReason, trigger: Trigger, reason: str) -> None:
        child.last_exit = exit
        child.ready_at = None
        child.next_restart_at = None
        self._fire(child, trigger, reason)

    def _post_exit(self, child: _Child, exit: ExitReason) -> None:
        """Queue an exit seen while starting, for the loop to decide on."""
        assert child.run is not None
        self._inbox_send.send_nowait(_Exited(child, child.run, exit))

    async def _launch(self, child: _Child, reason: str) -> ExitReason | None:
        """Start one run of ``child``; None once it is ready, else how it exited."""
        assert self._nursery is not None
        run = _Run()
        child.run = run
        child.next_restart_at = None
        self._fire(child, Trigger.START, reason)
        ctx = ChildContext((*self._path, child.id), run, self._bus)
        self._nursery.start_soon(self._run_child, child, run, ctx, name=f"child {child.id}")
        await run.settled.wait()
        if not run.ready:
            assert run.exit is not None
            return run.exit
        child.ready_at = trio.current_time()
        self._fire(child, Trigger.STARTED, "ready")
        return None

    async def _run_child(self, child: _Child, run: _Run, ctx: ChildContext) -> None:
        exit: ExitReason | None = None
        try:
            with run.scope:
                target = child.spec.start
                if isinstance(target, Supervisor):
                    await target._serve(ctx, trio.TASK_STATUS_IGNORED)
                    result: Any = None
                else:
                    result = await target(ctx)
                exit = result if isinstance(result, ExitReason) else ExitReason.normal()
            if exit is None:  # our own scope cancelled it: only a stop does that
                exit = ExitReason.shutdown("killed")
        except Exception as exc:
            exit = ExitReason.abnormal(_describe(exc))
            if not run.stopping:
                logger.error("%s crashed", "/".join(ctx.path), exc_info=exc)
        finally:
            run.exit = exit or ExitReason.shutdown("cancelled")
            run.finished.set()
            run.settled.set()
        if run.ready and not run.stopping:
            self._inbox_send.send_nowait(_Exited(child, run, run.exit))

    async def _shutdown(self, child: _Child, reason: str) -> None:
        """Stop ``child`` within its shutdown spec; return once its task is gone."""
        if child.state is ChildState.BACKOFF:
            child.next_restart_at = None
            self._fire(child, Trigger.STOP, reason)
            return
        run = child.run
        if not child.lifecycle.active or run is None or run.stopping:
            return
        run.stopping = True
        self._fire(child, Trigger.STOP, reason)
        grace = child.spec.effective_shutdown
        if grace == BRUTAL_KILL:
            run.killed = True
            run.scope.cancel()
        else:
            run.stop_requested.set()
            if grace != INFINITY:
                assert isinstance(grace, int | float)
                with trio.move_on_after(grace):
                    await run.finished.wait()
                if not run.finished.is_set():
                    logger.warning(
                        "%s did not stop within %ss; cancelling it",
                        "/".join((*self._path, child.id)),
                        grace,
                    )
                    run.killed = True
                    run.scope.cancel()
        await run.finished.wait()
        assert run.exit is not None
        if run.exit.kind is ExitKind.ABNORMAL:
            exit = run.exit
        elif run.killed:
            exit = ExitReason.shutdown(f"{reason}; killed")
        else:
            exit = ExitReason.shutdown(reason)
        self._settle_exit(child, exit, Trigger.TERMINATED, reason)

    def _abandon_all(self, reason: str) -> None:
        """Record children whose tasks died with the nursery (outside cancellation)."""
        for child in reversed(self._children):
            if child.state in (ChildState.STARTING, ChildState.RUNNING, ChildState.BACKOFF):
                self._fire(child, Trigger.STOP, reason)
            if child.state is ChildState.STOPPING:
                self._settle_exit(child, ExitReason.shutdown(reason), Trigger.TERMINATED, reason)
            child.next_restart_at = None

    async def _stop_all(self, reason: str) -> None:
        for child in reversed(self._children):
            await self._shutdown(child, reason)

    async def _handle_exit(self, message: _Exited) -> None:
        child = message.child
        if (
            child not in self._children
            or message.run is not child.run
            or child.state not in (ChildState.STARTING, ChildState.RUNNING)
        ):
            return  # stale: the child was stopped, restarted or deleted meanwhile
        exit = message.exit
        now = trio.current_time()
        ran_for = now - child.ready_at if child.ready_at is not None else 0.0
        decision = child.tracker.decide(exit, now=now, ran_for=ran_for)
        if isinstance(decision, NoRestart):
            self._settle_exit(child, exit, Trigger.EXITED, str(exit))
            if child.spec.restart is RestartType.TEMPORARY:
                self._children.remove(child)
            return
        if isinstance(decision, GiveUp):
            self._settle_exit(
                child,
                exit,
                Trigger.GAVE_UP,
                f"{exit}; gave up after {decision.restarts} restarts within {decision.period}s",
            )
            return
        if self._window is not None and not self._window.record(now):
            assert self.intensity is not None
            self._settle_exit(child, exit, Trigger.EXITED, f"{exit}; restart intensity exceeded")
            self._phase = SupervisorPhase.STOPPING
            await self._stop_all("restart intensity exceeded")
            raise RestartIntensityExceeded(
                f"supervisor {self._name}: more than {self.intensity.max_restarts} restarts "
                f"within {self.intensity.period}s (last: child {child.id!r}, {exit})"
            )
        self._settle_exit(
            child, exit, Trigger.RESTARTING, f"{exit}; restart in {decision.delay:g}s"
        )
        child.next_restart_at = decision.at
        group = self._group_of(child)
        for sibling in reversed(group):
            await self._shutdown(sibling, f"restarting with {child.id!r}")
        for sibling in group:
            if sibling.spec.restart is RestartType.TEMPORARY:
                self._children.remove(sibling)
            elif sibling.state in (ChildState.STOPPED, ChildState.BACKOFF):
                sibling.next_restart_at = max(sibling.next_restart_at or 0.0, decision.at)
                self._fire(sibling, Trigger.SCHEDULE, f"restarting with {child.id!r}")

    def _group_of(self, child: _Child) -> list[_Child]:
        """The siblings the strategy restarts along with ``child``, in start order."""
        if self.strategy is Strategy.ONE_FOR_ALL:
            return [c for c in self._children if c is not child]
        if self.strategy is Strategy.REST_FOR_ONE:
            return self._children[self._children.index(child) + 1 :]
        return []

    async def _restart_due(self) -> None:
        now = trio.current_time()
        for child in list(self._children):
            if child.state is not ChildState.BACKOFF or child not in self._children:
                continue
            if child.next_restart_at is None or child.next_restart_at > now:
                continue
            exit = await self._launch(child, "restart")
            if exit is not None:
                self._post_exit(child, exit)
