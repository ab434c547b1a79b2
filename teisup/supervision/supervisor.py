"""The supervisor runtime: a thin Trio shell around the pure policy.

Theory of operation
-------------------
A `Supervisor` owns one nursery and one main-loop task. Each run of each child
is one more task in the nursery, wrapped in a cancel scope of its own (a
`Run`, in `runtime`). Those tasks never decide anything: they post what
happened (the child reported ready, reported its health, exited) to the
supervisor's `Inbox`.

**Only the main loop changes state.** Public methods (`start_child`,
`terminate_child`, ...) post a `Call` to the same inbox and wait for its
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
SIGTERM and cancellation to SIGKILL. A supervisor stopping all its children
does so in reverse start order, one after the other, or, with
``parallel_shutdown``, asks them all at once and waits for them together.

Which siblings a restart takes along is `policy.plan_restart`'s decision;
when the restart is due is the child's `RestartTracker`'s. An error in the
latter (a child's own numbers) fails that child alone.

Backoff never blocks the loop: a child waiting to restart is in ``backoff``
with a due time, and the loop wakes at the earliest one.

All times come from ``trio.current_time()``: monotonic, and virtual under
``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TypeVar

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
from .inbox import Call, Inbox, Message, Wake
from .introspection import (
    ChildCounts,
    ChildInfo,
    SupervisorPhase,
    SupervisorStatistics,
    TreeNode,
    child_info,
    child_node,
    count_children,
)
from .lifecycle import ChildState, Trigger
from .policy import (
    ExitKind,
    ExitReason,
    GiveUp,
    GroupMember,
    Intensity,
    NoRestart,
    RestartType,
    RestartWindow,
    Strategy,
    plan_restart,
)
from .runtime import (
    Child,
    ChildContext,
    Exited,
    Health,
    Ready,
    Run,
    describe,
    run_child,
)
from .specs import BRUTAL_KILL, INFINITY, ChildKind, ChildSpec, validate_id

__all__ = ["ChildContext", "Supervisor"]

logger = logging.getLogger("teisup.supervision")

#: Elixir's default: 3 restarts within 5 s (Erlang's is 1 within 5 s).
DEFAULT_INTENSITY = Intensity(max_restarts=3, period=5.0)

T = TypeVar("T")

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
    limit: past it, it stops every child and `run` raises
    `RestartIntensityExceeded`. A parent sees that as a ``shutdown`` exit of
    its child, as in OTP: a ``permanent`` parent spec restarts the sub-tree, a
    ``transient`` one does not. ``None`` means no limit. ``max_children`` caps
    the number of children (static and dynamic).

    When it stops all its children (`stop`, its intensity exceeded, a static
    child failing to start), it stops them in reverse start order, each within
    its shutdown spec before the next, as OTP does: the order is how a static
    tree says what depends on what. ``parallel_shutdown=True`` asks them all to
    stop at once and waits for them together, so the whole stop takes about
    the longest grace rather than their sum; that is for a supervisor of
    independent dynamic children, as OTP's ``simple_one_for_one``, which
    terminates its children asynchronously. Group restarts stay serial.

    Its children's transitions are logged at ``transition_log_level`` (DEBUG
    by default: the tree's internal workers are no news to an operator), each
    record carrying ``event="transition"``, the new ``state``, the ``pid``
    when there is one, and the child's id under the key ``child_label``.

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
        parallel_shutdown: bool = False,
        transition_log_level: int = logging.DEBUG,
        child_label: str = "child",
    ) -> None:
        self.id = validate_id(id)
        self._transition_log_level = transition_log_level
        self._child_label = child_label
        self.strategy = Strategy(strategy)
        self.intensity = intensity
        if max_children is not None and max_children < 0:
            raise ValueError(f"max_children must be >= 0, got {max_children!r}")
        self.max_children = max_children
        self.parallel_shutdown = bool(parallel_shutdown)
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
        self._children: list[Child] = []
        self._window: RestartWindow | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested = False
        self._done = trio.Event()
        self._inbox = Inbox()

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
        """Stop every child (see the class: in reverse start order, or all at
        once with ``parallel_shutdown``), then return once `run` has."""
        if self._phase in _RUNNING_PHASES:
            self._stop_requested = True
            self._post(Wake())
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Return once the supervisor is not running (at once if it never ran)."""
        if self._phase in _RUNNING_PHASES:
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    def _post(self, message: Message) -> None:
        self._inbox.post(message)

    async def _serve(self, ctx: ChildContext | None, task_status: trio.TaskStatus[None]) -> None:
        if self._phase in _RUNNING_PHASES:
            raise RuntimeError(f"supervisor {self.id!r} is already running")
        if ctx is None:
            self._bus, self._path = self._own_bus, (self.id,)
        else:
            self._bus, self._path = ctx.bus, ctx.path
        self._children = [self._new_child(spec) for spec in self._initial]
        self._window = RestartWindow(self.intensity) if self.intensity else None
        self._stop_requested = False
        if self._done.is_set():
            self._done = trio.Event()
        self._inbox = Inbox()
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
            self._inbox.refuse_pending(self._not_running)
            self._done.set()
        if error is not None:
            raise error

    def _new_child(self, spec: ChildSpec) -> Child:
        return Child(spec, self.intensity.period if self.intensity else 5.0)

    async def _relay_stop_request(self, ctx: ChildContext) -> None:
        await ctx.wait_stop_requested()
        self._stop_requested = True
        self._post(Wake())

    def _not_running(self) -> SupervisorNotRunning:
        return SupervisorNotRunning(f"supervisor {self._name} is {self._phase.value}, not running")

    def _cancelled(self) -> SupervisorNotRunning:
        return SupervisorNotRunning(f"supervisor {self._name} was cancelled")

    async def _start_initial_children(self) -> None:
        for child in list(self._children):
            try:
                await self._start(child, "supervisor starting", SupervisorStartError)
            except SupervisorStartError:
                await self._stop_all("a sibling failed to start")
                raise

    async def _loop(self) -> None:
        while True:
            due = min(
                (c.next_restart_at for c in self._children if c.next_restart_at is not None),
                default=math.inf,
            )
            message = await self._inbox.receive_until(due)
            if self._stop_requested:
                self._phase = SupervisorPhase.STOPPING
                if isinstance(message, Call):
                    message.answer(error=self._not_running())
                await self._stop_all("supervisor stopping")
                return
            if isinstance(message, Call):
                await message.perform(self._cancelled)
            elif isinstance(message, Exited):
                await self._handle_exit(message)
            elif isinstance(message, Ready):
                self._handle_ready(message)
            elif isinstance(message, Health):
                self._handle_health(message)
            await self._restart_due()

    # -- the public child API ------------------------------------------------------

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        # Calls made while the static children start (by a child that is ready)
        # queue up and run once the loop begins.
        accepting = self._phase in (SupervisorPhase.STARTING, SupervisorPhase.RUNNING)
        if not accepting or self._stop_requested:
            raise self._not_running()
        call: Call[T] = Call(op, trio.lowlevel.current_task())
        self._post(call)
        return await call.result()

    def _get(self, child_id: str) -> Child:
        for child in self._children:
            if child.id == child_id:
                return child
        raise UnknownChildError(f"supervisor {self._name} has no child {child_id!r}")

    def _get_not_self(self, child_id: str, caller: trio.lowlevel.Task) -> Child:
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
        child = self._new_child(spec)
        self._children.append(child)
        try:
            await self._start(child, "added")
        except ChildStartError:
            self._children.remove(child)
            raise
        return child_info(child)

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
            await self._start(child, "restart requested")
            return child_info(child)

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
        return [child_info(c) for c in self._children]

    def count_children(self) -> ChildCounts:
        """OTP's ``count_children``."""
        return count_children(self._children)

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
            children=[child_node(c, now) for c in self._children],
        )

    # -- mechanics (run by the main loop only) --------------------------------------

    @property
    def _name(self) -> str:
        return repr("/".join(self._path))

    def _fire(self, child: Child, trigger: Trigger, reason: str) -> None:
        old, new = child.lifecycle.fire(trigger)
        path = (*self._path, child.id)
        fields: dict[str, object] = {
            "event": "transition",
            self._child_label: child.id,
            "state": new.value,
        }
        if child.pid is not None:
            fields["pid"] = child.pid
        logger.log(
            self._transition_log_level,
            "%s: %s -> %s (%s)",
            "/".join(path),
            old.value,
            new.value,
            reason,
            extra=fields,
        )
        self._bus.publish(TransitionEvent(path, old, new, reason, trio.current_time()))

    def _settle_exit(self, child: Child, exit: ExitReason, trigger: Trigger, reason: str) -> None:
        child.last_exit = exit
        child.ready_at = None
        child.next_restart_at = None
        self._fire(child, trigger, reason)

    def _post_exit(self, child: Child, exit: ExitReason) -> None:
        """Queue an exit seen while starting, for the loop to decide on."""
        assert child.run is not None
        self._post(Exited(child, child.run, exit))

    def _forget(self, ids: Collection[str]) -> None:
        if ids:
            self._children = [c for c in self._children if c.id not in ids]

    def _is_current(self, child: Child, run: Run) -> bool:
        return child in self._children and child.run is run and not run.stopping

    def _handle_ready(self, message: Ready) -> None:
        child = message.child
        if self._is_current(child, message.run) and child.state is ChildState.STARTING:
            child.ready_at = trio.current_time()
            self._fire(child, Trigger.STARTED, "ready")

    def _handle_health(self, message: Health) -> None:
        child = message.child
        if not self._is_current(child, message.run):
            return
        if message.healthy and child.state is ChildState.UNHEALTHY:
            self._fire(child, Trigger.RECOVERED, message.reason or "healthy")
        elif not message.healthy and child.state is ChildState.RUNNING:
            self._fire(child, Trigger.DEGRADED, message.reason or "unhealthy")

    async def _launch(self, child: Child, reason: str) -> ExitReason | None:
        """Start one run of ``child``.

        Returns None once it is ready (or at once, without ``await_ready``),
        else how it exited before reporting ready.
        """
        assert self._nursery is not None
        run = Run()
        child.run = run
        child.next_restart_at = None
        self._fire(child, Trigger.START, reason)
        ctx = ChildContext(self._post, self._bus, child, run, (*self._path, child.id))
        self._nursery.start_soon(run_child, child, run, ctx, self._post, name=f"child {child.id}")
        if not child.spec.await_ready:
            return None
        await run.settled.wait()
        if not run.ready:
            assert run.exit is not None
            return run.exit
        child.ready_at = trio.current_time()
        self._fire(child, Trigger.STARTED, "ready")
        return None

    async def _start(
        self, child: Child, reason: str, error: type[ChildStartError] = ChildStartError
    ) -> None:
        """Launch ``child`` where a failure to start is the caller's error.

        An abnormal exit before ready leaves it ``stopped`` and raises
        ``error``; any other exit before ready is an ordinary exit, queued
        for the loop to decide on.
        """
        exit = await self._launch(child, reason)
        if exit is None:
            return
        if exit.kind is ExitKind.ABNORMAL:
            self._settle_exit(child, exit, Trigger.EXITED, f"failed to start: {exit}")
            raise error(
                f"supervisor {self._name}: child {child.id!r} failed to start: {exit}", exit
            )
        self._post_exit(child, exit)

    def _begin_stop(self, child: Child, reason: str) -> Run | None:
        """Ask ``child`` to stop (or cancel it, under ``brutal_kill``).

        Returns the run to wait for, or None when there is none: a child in
        backoff only stops waiting; one at rest, or already stopping, is left.
        """
        if child.state is ChildState.BACKOFF:
            child.next_restart_at = None
            self._fire(child, Trigger.STOP, reason)
            return None
        run = child.run
        if not child.lifecycle.active or run is None or run.stopping:
            return None
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
                run.kill_at = trio.current_time() + grace
        return run

    async def _finish_stop(self, child: Child, run: Run, reason: str) -> None:
        """Wait for a run asked to stop, cancel it at its deadline, record its exit."""
        with trio.move_on_at(run.kill_at):
            await run.finished.wait()
        if not run.finished.is_set():
            logger.warning(
                "%s did not stop within %ss; cancelling it",
                "/".join((*self._path, child.id)),
                child.spec.effective_shutdown,
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

    async def _shutdown(self, child: Child, reason: str) -> None:
        """Stop ``child`` within its shutdown spec; return once its task is gone."""
        run = self._begin_stop(child, reason)
        if run is not None:
            await self._finish_stop(child, run, reason)

    async def _stop_all(self, reason: str) -> None:
        """Stop every child: in reverse start order, or all at once (parallel_shutdown)."""
        if not self.parallel_shutdown:
            for child in reversed(self._children):
                await self._shutdown(child, reason)
            return
        # Every child is asked (in reverse start order) before any is waited
        # for, so each one's grace runs concurrently with the others'.
        stopping = [
            (c, run) for c in reversed(self._children) if (run := self._begin_stop(c, reason))
        ]
        async with trio.open_nursery() as nursery:
            for child, run in stopping:
                nursery.start_soon(self._finish_stop, child, run, reason, name=f"stop {child.id}")

    def _abandon_all(self, reason: str) -> None:
        """Record children whose tasks died with the nursery (outside cancellation)."""
        for child in reversed(self._children):
            if child.state not in (ChildState.STOPPING, ChildState.STOPPED, ChildState.FAILED):
                self._fire(child, Trigger.STOP, reason)
            if child.state is ChildState.STOPPING:
                self._settle_exit(child, ExitReason.shutdown(reason), Trigger.TERMINATED, reason)
            child.next_restart_at = None

    async def _handle_exit(self, message: Exited) -> None:
        child = message.child
        if not self._is_current(child, message.run) or not (
            child.lifecycle.active and child.state is not ChildState.STOPPING
        ):
            return  # stale: the child was stopped, restarted or deleted meanwhile
        exit = message.exit
        now = trio.current_time()
        members = [GroupMember(c.id, c.spec.restart, c.state) for c in self._children]
        plan = plan_restart(self.strategy, members, self._children.index(child), exit.kind)
        if not plan.restart:
            self._settle_exit(child, exit, Trigger.EXITED, str(exit))
            self._forget(plan.drop)
            return
        ran_for = now - child.ready_at if child.ready_at is not None else 0.0
        try:
            decision = child.tracker.decide(exit, now=now, ran_for=ran_for)
        except Exception as exc:
            # The child's own numbers (its backoff, its intensity) failed: that is
            # this child's failure, never its supervisor's or its siblings'.
            logger.error(
                "%s: restart policy failed", "/".join((*self._path, child.id)), exc_info=exc
            )
            self._settle_exit(
                child, exit, Trigger.GAVE_UP, f"{exit}; restart policy failed: {describe(exc)}"
            )
            return
        assert not isinstance(decision, NoRestart)  # plan_restart applied the same rule
        if isinstance(decision, GiveUp):
            why = (
                "not restarted: the error is permanent"
                if decision.permanent
                else f"gave up after {decision.restarts} restarts within {decision.period}s"
            )
            self._settle_exit(child, exit, Trigger.GAVE_UP, f"{exit}; {why}")
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
        # Due `delay` after the backoff was announced (its event's time), which
        # is later than `now` by the deciding and the logging: "restart in
        # 0.1s" never comes sooner.
        child.next_restart_at = max(decision.at, trio.current_time() + decision.delay)
        reason = f"restarting with {child.id!r}"
        for sibling_id in plan.stop:
            await self._shutdown(self._get(sibling_id), reason)
        self._forget(plan.drop)
        for sibling_id in plan.schedule:
            sibling = self._get(sibling_id)
            sibling.next_restart_at = max(sibling.next_restart_at or 0.0, child.next_restart_at)
            self._fire(sibling, Trigger.SCHEDULE, reason)

    async def _restart_due(self) -> None:
        now = trio.current_time()
        for child in list(self._children):
            if child.state is not ChildState.BACKOFF or child not in self._children:
                continue
            if child.next_restart_at is None or child.next_restart_at > now:
                continue
            # A failed restart is one more exit, decided on like any other.
            exit = await self._launch(child, "restart")
            if exit is not None:
                self._post_exit(child, exit)
