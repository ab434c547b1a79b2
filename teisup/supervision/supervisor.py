"""The supervisor runtime: a thin Trio shell around the pure policy.

Theory of operation
-------------------
A `Supervisor` owns one nursery and one main-loop task. Each run of each child
is one more task in the nursery, wrapped in a cancel scope of its own (a
`_Run`). Those tasks never decide anything: they post what happened (the child
reported ready, reported its health, exited) to the supervisor's inbox.

**Only the main loop changes state.** Public methods (`start_child`,
`terminate_child`, ...) post a `_Call` to the same inbox and wait for its
answer, so every decision is serial, as in OTP's single supervisor process, and
a caller that is cancelled only stops waiting: the operation itself completes,
and no child is left half-stopped or half-started. When the loop ends, calls
still queued are answered with `SupervisorNotRunning`.

The loop does block while it starts a child that must report ready
(``await_ready``) or stops one within its shutdown spec; other events queue
meanwhile. That is OTP's behaviour too, and the reason slow starters use
``await_ready=False``.

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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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


T = TypeVar("T")


class _Run:
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


# Messages to the main loop.


@dataclass(slots=True)
class _Exited:
    child: _Child
    run: _Run
    exit: ExitReason


@dataclass(slots=True)
class _Ready:
    child: _Child
    run: _Run


@dataclass(slots=True)
class _Health:
    child: _Child
    run: _Run
    healthy: bool
    reason: str


@dataclass(slots=True)
class _Wake:
    pass


class _Call(Generic[T]):
    """A public method's operation, run by the main loop, answered once."""

    def __init__(self, op: Callable[[], Awaitable[T]], caller: trio.lowlevel.Task) -> None:
        self.op = op
        self.caller = caller
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def answer(self, value: T | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()


_Message = _Exited | _Ready | _Health | _Wake | _Call[Any]


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
        self, supervisor: Supervisor, child: _Child, run: _Run, path: tuple[str, ...]
    ) -> None:
        self._supervisor = supervisor
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
        return self._supervisor.events

    def started(self, *, pid: int | None = None) -> None:
        """Report ready (and, for an OS process, its pid). Only the first call counts."""
        if self._run.ready or self._run.settled.is_set():
            return
        if pid is not None:
            self._run.pid = pid
        self._run.ready = True
        self._run.settled.set()
        if not self._child.spec.await_ready:
            self._supervisor._post(_Ready(self._child, self._run))

    def report_pid(self, pid: int | None) -> None:
        """Record the OS process this child currently runs, for introspection."""
        self._run.pid = pid

    def report_health(self, healthy: bool, reason: str = "") -> None:
        """Move a ready child between ``running`` and ``unhealthy``.

        Reporting the state it is already in does nothing; reports before ready
        are ignored (start-up is the worker's own business).
        """
        self._supervisor._post(_Health(self._child, self._run, healthy, reason))

    @property
    def stop_requested(self) -> bool:
        return self._run.stop_requested.is_set()

    async def wait_stop_requested(self) -> None:
        """Return once the supervisor asks this child to stop."""
        await self._run.stop_requested.wait()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_RUNNING_PHASES = (SupervisorPhase.STARTING, SupervisorPhase.RUNNING, SupervisorPhase.STOPPING)


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
    raises `RestartIntensityExceeded`. A parent sees that as a ``shutdown``
    exit of its child, as in OTP: a ``permanent`` parent spec restarts the
    sub-tree, a ``transient`` one does not. ``None`` means no limit.
    ``max_children`` caps the number of children (static and dynamic).

    A supervisor can run again after it stopped (its parent restarts it that
    way); each run starts from the children given here. Children added with
    `start_child` are lost then, as in OTP. Subscribe to the events of a tree
    on its root: a sub-supervisor publishes on its parent's bus.
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
        self._children: list[_Child] = []
        self._window: RestartWindow | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested = False
        self._done = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Message](math.inf)

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
        the intensity is exceeded; both unwrapped, never in an exception group.
        """
        await self._serve(None, task_status)

    async def stop(self) -> None:
        """Stop every child in reverse start order, then return once `run` has."""
        if self._phase in _RUNNING_PHASES:
            self._stop_requested = True
            self._post(_Wake())
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Return once the supervisor is not running (at once if it never ran)."""
        if self._phase in _RUNNING_PHASES:
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    def _post(self, message: _Message) -> None:
        self._inbox_send.send_nowait(message)

    async def _serve(self, ctx: ChildContext | None, task_status: trio.TaskStatus[None]) -> None:
        if self._phase in _RUNNING_PHASES:
            raise RuntimeError(f"supervisor {self.id!r} is already running")
        if ctx is None:
            self._bus, self._path = self._own_bus, (self.id,)
        else:
            self._bus, self._path = ctx.bus, ctx.path
        period = self.intensity.period if self.intensity else 5.0
        self._children = [_Child(spec, period) for spec in self._initial]
        self._window = RestartWindow(self.intensity) if self.intensity else None
        self._stop_requested = False
        if self._done.is_set():
            self._done = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Message](math.inf)
        self._phase = SupervisorPhase.STARTING
        # Errors of our own are raised outside the nursery, so that callers see
        # them as they are rather than wrapped in an exception group.
        error: SupervisionError | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
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
            self._refuse_pending_calls()
            self._done.set()
        if error is not None:
            raise error

    async def _relay_stop_request(self, ctx: ChildContext) -> None:
        await ctx.wait_stop_requested()
        self._stop_requested = True
        self._post(_Wake())

    def _refuse_pending_calls(self) -> None:
        while True:
            try:
                message = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(message, _Call):
                message.answer(error=self._not_running())

    def _not_running(self) -> SupervisorNotRunning:
        return SupervisorNotRunning(f"supervisor {self._name} is {self._phase.value}, not running")

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
            message: _Message | None = None
            with trio.move_on_at(due):
                message = await self._inbox.receive()
            if self._stop_requested:
                self._phase = SupervisorPhase.STOPPING
                if isinstance(message, _Call):
                    message.answer(error=self._not_running())
                await self._stop_all("supervisor stopping")
                return
            if isinstance(message, _Call):
                await self._perform(message)
            elif isinstance(message, _Exited):
                await self._handle_exit(message)
            elif isinstance(message, _Ready):
                self._handle_ready(message)
            elif isinstance(message, _Health):
                self._handle_health(message)
            await self._restart_due()

    async def _perform(self, call: _Call[Any]) -> None:
        try:
            value = await call.op()
        except Exception as exc:
            call.answer(error=exc)
        else:
            call.answer(value)
        finally:
            if not call.done.is_set():
                # Cancelled from outside mid-operation: the caller must not wait forever.
                call.answer(error=SupervisorNotRunning(f"supervisor {self._name} was cancelled"))

    # -- the public child API ------------------------------------------------------

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        # Calls made while the static children start (by a child that is ready)
        # queue up and run once the loop begins.
        accepting = self._phase in (SupervisorPhase.STARTING, SupervisorPhase.RUNNING)
        if not accepting or self._stop_requested:
            raise self._not_running()
        call: _Call[T] = _Call(op, trio.lowlevel.current_task())
        self._post(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.value  # type: ignore[return-value]

    def _get(self, child_id: str) -> _Child:
        for child in self._children:
            if child.id == child_id:
                return child
        raise UnknownChildError(f"supervisor {self._name} has no child {child_id!r}")

    def _get_not_self(self, child_id: str, caller: trio.lowlevel.Task) -> _Child:
        child = self._get(child_id)
        if child.run is not None and child.run.task is caller and not child.run.finished.is_set():
            raise ChildRunningError(
                f"supervisor {self._name}: child {child_id!r} cannot stop or restart itself "
                "through its supervisor; return from the worker instead"
            )
        return child

    async def start_child(self, spec: ChildSpec) -> ChildInfo:
        """Add a child at the end of the start order and start it.

        Raises `DuplicateChildError`, `MaxChildrenError`, or `ChildStartError`
        (the spec is then not kept) if it fails before reporting ready.
        """
        return await self._call(lambda: self._start_child(spec))

    async def _start_child(self, spec: ChildSpec) -> ChildInfo:
        if any(c.id == spec.id for c in self._children):
            raise DuplicateChildError(f"supervisor {self._name} already has a child {spec.id!r}")
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
                    f"supervisor {self._name}: child {spec.id!r} failed to start: {exit}", exit
                )
            self._post_exit(child, exit)
        return self._info(child)

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child within its shutdown spec; keep its spec (not a temporary's).

        A child waiting in backoff just stops waiting. Stopping a stopped child
        does nothing. A worker cannot terminate itself this way (it returns).
        """
        caller = trio.lowlevel.current_task()

        async def op() -> None:
            child = self._get_not_self(child_id, caller)
            await self._shutdown(child, "terminated on request")
            if child.spec.restart is RestartType.TEMPORARY:
                self._children.remove(child)

        await self._call(op)

    async def restart_child(self, child_id: str) -> ChildInfo:
        """Start a child again from scratch, stopping it first if it runs.

        Its restart history (backoff streak, intensity window) is forgotten, so
        this is also how a ``failed`` child is brought back. Raises
        `ChildStartError` if it fails before reporting ready; it then stays
        stopped.
        """
        caller = trio.lowlevel.current_task()

        async def op() -> ChildInfo:
            child = self._get_not_self(child_id, caller)
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

        return await self._call(op)

    async def delete_child(self, child_id: str) -> None:
        """Forget a child that is not running (terminate it first)."""

        async def op() -> None:
            child = self._get(child_id)
            if child.state not in (ChildState.STOPPED, ChildState.FAILED):
                raise ChildRunningError(
                    f"supervisor {self._name}: child {child_id!r} is {child.state.value}; "
                    "terminate it before deleting it"
                )
            self._children.remove(child)

        await self._call(op)

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

    # -- mechanics (run by the main loop only) --------------------------------------

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
        self._post(_Exited(child, child.run, exit))

    def _is_current(self, child: _Child, run: _Run) -> bool:
        return child in self._children and child.run is run and not run.stopping

    def _handle_ready(self, message: _Ready) -> None:
        child = message.child
        if self._is_current(child, message.run) and child.state is ChildState.STARTING:
            child.ready_at = trio.current_time()
            self._fire(child, Trigger.STARTED, "ready")

    def _handle_health(self, message: _Health) -> None:
        child = message.child
        if not self._is_current(child, message.run):
            return
        if message.healthy and child.state is ChildState.UNHEALTHY:
            self._fire(child, Trigger.RECOVERED, message.reason or "healthy")
        elif not message.healthy and child.state is ChildState.RUNNING:
            self._fire(child, Trigger.DEGRADED, message.reason or "unhealthy")

    async def _launch(self, child: _Child, reason: str) -> ExitReason | None:
        """Start one run of ``child``.

        Returns None once it is ready (or at once, without ``await_ready``),
        else how it exited before reporting ready.
        """
        assert self._nursery is not None
        run = _Run()
        child.run = run
        child.next_restart_at = None
        self._fire(child, Trigger.START, reason)
        ctx = ChildContext(self, child, run, (*self._path, child.id))
        self._nursery.start_soon(self._run_child, child, run, ctx, name=f"child {child.id}")
        if not child.spec.await_ready:
            return None
        await run.settled.wait()
        if not run.ready:
            assert run.exit is not None
            return run.exit
        child.ready_at = trio.current_time()
        self._fire(child, Trigger.STARTED, "ready")
        return None

    async def _run_child(self, child: _Child, run: _Run, ctx: ChildContext) -> None:
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
                        exit = ExitReason.shutdown(_describe(exc))
                    result: Any = None
                else:
                    result = await target(ctx)
                if exit is None:
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
        # Exits before ready under await_ready are the launcher's to handle.
        if (run.ready or not child.spec.await_ready) and not run.stopping:
            self._post(_Exited(child, run, run.exit))

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
        elif run.exit.kind is ExitKind.SHUTDOWN and run.exit.detail:
            exit = ExitReason.shutdown(f"{reason}; {run.exit.detail}")  # the worker's account
        else:
            exit = ExitReason.shutdown(reason)
        self._settle_exit(child, exit, Trigger.TERMINATED, reason)

    def _abandon_all(self, reason: str) -> None:
        """Record children whose tasks died with the nursery (outside cancellation)."""
        for child in reversed(self._children):
            if child.state not in (ChildState.STOPPING, ChildState.STOPPED, ChildState.FAILED):
                self._fire(child, Trigger.STOP, reason)
            if child.state is ChildState.STOPPING:
                self._settle_exit(child, ExitReason.shutdown(reason), Trigger.TERMINATED, reason)
            child.next_restart_at = None

    async def _stop_all(self, reason: str) -> None:
        for child in reversed(self._children):
            await self._shutdown(child, reason)

    async def _handle_exit(self, message: _Exited) -> None:
        child = message.child
        if not self._is_current(child, message.run) or not (
            child.lifecycle.active and child.state is not ChildState.STOPPING
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
