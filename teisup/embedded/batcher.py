"""TEI-style batching: one FIFO queue, batches cut by a token budget, one pass at a time.

Requests from every client go into one queue (`Batcher.submit`). Whenever the
model is free, the batching task (`Batcher.run`) takes the entries at the head
of the queue that fit (`BatchLimits.take`: the padded size, longest entry times
count, within ``max_batch_tokens``, the count within ``max_batch_requests``),
runs them as one pass on the process's inference thread
(`engine.InferenceThread`) and hands each entry its row. Arrivals during a
pass form the next batch, so batches grow with load. Entries whose caller went
away before their batch started are dropped, never computed. Only one pass runs
at a time: PyTorch spreads one pass over every core, and a second would only
fight it for them.

**When to cut** is `Gathering`'s decision, pure and driven by the clock it is
given. A batch is cut at once when it is full, or when nobody is expected:
a lone caller never waits. Two kinds of callers are expected:

* *callers coming back*: every answered entry is a caller that may send its
  next request soon (a client looping on unary calls, or a pool of them); each
  arrival is one of them back. Answers older than ``return_s`` no longer count,
  nor do those still out when a wait ends. This keeps 32 clients calling in
  a loop in batches of 32, instead of the batch of the first few to come back
  running while the rest arrive, split in two passes that each fight the event
  loop for the cores;
* *open streams* (`OpenStream.expects_more`): a stream that has just started,
  or whose client keeps several requests outstanding.

While someone is expected, the batcher waits for the next arrival, at most
``quiet_s`` after the last arrival or answer, and never longer in all than
``max_s`` nor a quarter of the last pass (waiting for a batch is worth it only
against the cost of a pass). Before each decision the event loop first finishes what it is
already doing (until every other task is blocked), so requests being
received, parsed and tokenized right now are in the queue.

**Admission.** At most ``max_concurrent_requests`` requests are queued or
running: a caller takes a place (`Batcher.try_admit`, or `Batcher.admit` to
wait for one) before submitting and gives it back (`Batcher.release`) once
its answer is computed. ``try_admit`` never waits, for calls refused at once
when the server is full (RESOURCE_EXHAUSTED / 429).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import trio
from trio.testing import wait_all_tasks_blocked

from .engine import INFERENCE_THREAD, Encoded, Engine, Outputs
from .metrics import Metrics

__all__ = [
    "BatchError",
    "BatchLimits",
    "Batcher",
    "BatcherStatistics",
    "Gathering",
    "Job",
    "OpenStream",
]


class BatchError(Exception):
    """The batch holding this entry failed in the model (TEI: a Backend error)."""


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one pass may hold: TEI's ``--max-batch-tokens`` and ``--max-batch-requests``."""

    max_batch_tokens: int
    max_batch_requests: int | None = None

    def take(self, lengths: Sequence[int]) -> int:
        """How many entries from the head of a queue of ``lengths`` (tokens) form the batch.

        Entries are taken in order while the padded batch (its longest entry
        times its count) stays within the token budget and the count within
        the request cap. The first entry is always taken: a request longer
        than the budget is refused before it is queued, so this never stalls.
        """
        longest = 0
        for count, length in enumerate(lengths):
            if self.max_batch_requests is not None and count >= self.max_batch_requests:
                return count
            longest = max(longest, length)
            if count and longest * (count + 1) > self.max_batch_tokens:
                return count
        return len(lengths)

    def full(self, lengths: Sequence[int]) -> bool:
        """Whether ``lengths`` already fill a batch (no arrival could join the next pass)."""
        return self.take(lengths) < len(lengths) or (
            self.max_batch_requests is not None and len(lengths) >= self.max_batch_requests
        )


class Gathering:
    """When an idle model should start its next batch: pure, on the clock it is given.

    The batcher tells it what happens (`answered`, `arrived`, `pass_took`) and
    asks `wait_until` before cutting a batch; times are in seconds on any one
    clock (the batcher uses Trio's, tests a `trio.testing.MockClock`).
    """

    def __init__(self, *, quiet_s: float, max_s: float, return_s: float) -> None:
        self.quiet_s = quiet_s
        """The longest wait for the next arrival of someone expected."""
        self.max_s = max_s
        """The longest a batch is held back in all."""
        self.return_s = return_s
        """How long an answered caller counts as coming back."""
        self._returning: collections.deque[float] = collections.deque()
        self._last_pass_s = max_s * 4
        self._last_news = -float("inf")

    def answered(self, count: int, now: float) -> None:
        """``count`` callers got their answers at ``now``."""
        self._returning.extend([now] * count)
        self._last_news = max(self._last_news, now)

    def arrived(self, now: float) -> None:
        """An entry was queued at ``now``: one caller back, if one was expected."""
        self._last_news = max(self._last_news, now)
        if self._returning:
            self._returning.popleft()

    def pass_took(self, seconds: float) -> None:
        """The last pass ran for ``seconds``."""
        self._last_pass_s = seconds

    def expected(self, now: float) -> int:
        """Answered callers not yet back, within ``return_s``."""
        while self._returning and self._returning[0] < now - self.return_s:
            self._returning.popleft()
        return len(self._returning)

    def wait_until(
        self, now: float, *, since: float, full: bool, streams_expect_more: bool
    ) -> float | None:
        """The time to wait until for one more arrival, or None to cut the batch now.

        ``since`` is when the batch started waiting (its first entry's arrival,
        or the end of the last pass), ``full`` whether the queue already fills
        a batch, ``streams_expect_more`` whether an open stream is likely to
        send more right now.
        """
        if full or not (streams_expect_more or self.expected(now)):
            return None
        # Quiet since the last arrival or answer, whichever came last: callers
        # just answered get quiet_s to show up even if nobody arrived lately.
        limit = since + min(self.max_s, self._last_pass_s / 4)
        until = min(self._last_news + self.quiet_s, limit)
        if until > now:
            return until
        # Those not back by now are not coming soon: stop expecting them, so
        # that a caller gone for good costs one wait, not one every batch.
        self._returning.clear()
        return None


@dataclass(eq=False, slots=True)
class Job:
    """One queued input, and once done its row of the batch's outputs."""

    encoded: Encoded
    want_tokens: bool
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    done: trio.Event = field(default_factory=trio.Event)
    outputs: Outputs | None = None
    row: int = 0
    error: BaseException | None = None
    dropped: bool = False
    queue_ns: int = 0
    inference_ns: int = 0


@dataclass(eq=False, slots=True)
class OpenStream:
    """A stream whose client may still send inputs, as `Gathering` sees it."""

    received: int = 0
    """Messages received so far."""
    answered: int = 0
    """Answers sent so far."""
    pipelined: bool = False
    """Whether the client ever had two requests or more awaiting answers."""

    def on_request(self) -> None:
        """Count one received message."""
        self.received += 1
        if self.received - self.answered > 1:
            self.pipelined = True

    def on_answer(self) -> None:
        """Count one sent answer."""
        self.answered += 1

    @property
    def expects_more(self) -> bool:
        """Whether another message is likely on its way right now."""
        return self.pipelined or self.received <= 1


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """What `Batcher.statistics` reports."""

    queued: int
    """Entries waiting for a batch."""
    admitted: int
    """Requests holding a place (queued, running, or being answered)."""
    capacity: int
    """``max_concurrent_requests``."""
    passes: int
    """Passes run so far."""
    entries: int
    """Entries computed so far (``entries / passes`` is the mean batch size)."""


class Batcher:
    """The shared queue and the task that batches it (`run`)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_tokens: int,
        max_batch_requests: int | None,
        max_concurrent_requests: int,
        metrics: Metrics,
        on_health: Callable[[bool], None] = lambda ok: None,
        gather_quiet_s: float = 0.005,
        gather_max_s: float = 0.05,
        return_s: float = 0.1,
    ) -> None:
        self.engine = engine
        self.limits = BatchLimits(max_batch_tokens, max_batch_requests)
        self.metrics = metrics
        self.capacity = max_concurrent_requests
        self.permits = trio.Semaphore(max_concurrent_requests)
        """Held from admission until the result is back (TEI's semaphore)."""
        self.gathering = Gathering(quiet_s=gather_quiet_s, max_s=gather_max_s, return_s=return_s)
        self._on_health = on_health
        self._queue: collections.deque[Job] = collections.deque()
        self._arrived = trio.Event()
        self._streams: set[OpenStream] = set()
        self._passes = 0
        self._entries = 0

    # -- admission ------------------------------------------------------------------

    def try_admit(self) -> bool:
        """Take a place among ``max_concurrent_requests`` if one is free; never waits."""
        try:
            self.permits.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    async def admit(self) -> None:
        """Take a place, waiting for one if the server is full (no checkpoint if one is free)."""
        if not self.try_admit():
            await self.permits.acquire()

    def release(self) -> None:
        """Give back a place taken by `try_admit` or `admit`."""
        self.permits.release()

    def statistics(self) -> BatcherStatistics:
        """The queue, the places taken and the passes run so far."""
        return BatcherStatistics(
            queued=len(self._queue),
            admitted=self.capacity - self.permits.value,
            capacity=self.capacity,
            passes=self._passes,
            entries=self._entries,
        )

    @property
    def queued(self) -> int:
        """Entries waiting for a batch."""
        return len(self._queue)

    # -- callers --------------------------------------------------------------------

    @contextlib.contextmanager
    def stream_open(self, stream: OpenStream) -> Iterator[None]:
        """Register ``stream`` while its client may send more inputs (see `Gathering`)."""
        self._streams.add(stream)
        try:
            yield
        finally:
            self._streams.discard(stream)
            self._arrived.set()  # a gather waiting for this stream need not wait on

    async def submit(self, encoded: Encoded, *, want_tokens: bool = False) -> Job:
        """Queue ``encoded``, wait for its batch, return the finished `Job`.

        Raises `BatchError` if its batch failed. If the caller is cancelled
        while the entry still waits, the entry is dropped from the queue.
        """
        job = Job(encoded, want_tokens)
        self._queue.append(job)
        self.gathering.arrived(trio.current_time())
        self.metrics.set("te_queue_size", len(self._queue))
        self._arrived.set()
        try:
            await job.done.wait()
        except BaseException:
            if job.outputs is None and job.error is None:
                job.dropped = True  # the batcher skips it; nobody waits for it
            raise
        if job.error is not None:
            raise BatchError(str(job.error)) from job.error
        return job

    # -- the batching task ----------------------------------------------------------

    async def gather(self, since: float) -> None:
        """Wait, as `Gathering` decides, for arrivals to join the next batch."""
        while True:
            # Whatever is being received, parsed and tokenized right now
            # reaches the queue first (at most a scheduler round when idle).
            await wait_all_tasks_blocked()
            self._drop_cancelled()
            until = self.gathering.wait_until(
                trio.current_time(),
                since=since,
                full=self.limits.full([len(j.encoded.ids) for j in self._queue]),
                streams_expect_more=any(s.expects_more for s in self._streams),
            )
            if until is None:
                return
            self._arrived = trio.Event()
            with trio.move_on_at(until):
                # An arrival, or a stream closing (its last messages may
                # still be on their way to the queue): look again.
                await self._arrived.wait()

    def _drop_cancelled(self) -> None:
        if any(job.dropped for job in self._queue):
            kept = [job for job in self._queue if not job.dropped]
            self.metrics.inc("te_request_failure", len(self._queue) - len(kept), err="dropped")
            self._queue = collections.deque(kept)
            self.metrics.set("te_queue_size", len(self._queue))

    def _next_batch(self) -> list[Job]:
        self._drop_cancelled()
        count = self.limits.take([len(j.encoded.ids) for j in self._queue])
        batch = [self._queue.popleft() for _ in range(count)]
        self.metrics.set("te_queue_size", len(self._queue))
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch and run the queue until cancelled."""
        task_status.started()
        free_since = trio.current_time()
        while True:
            if not self._queue:
                self._arrived = trio.Event()
                await self._arrived.wait()
                if not self._queue:
                    continue  # woken by a stream closing, not by an arrival
                free_since = trio.current_time()
            await self.gather(free_since)
            batch = self._next_batch()
            if batch:
                await self._run_batch(batch)
            free_since = trio.current_time()

    async def _run_batch(self, batch: list[Job]) -> None:
        start = time.perf_counter_ns()
        self.metrics.observe("te_batch_next_size", len(batch))
        self.metrics.observe("te_batch_next_tokens", sum(len(j.encoded.ids) for j in batch))
        want_tokens = any(j.want_tokens for j in batch)
        encoded = [j.encoded for j in batch]
        try:
            # The forward pass is not cancellable mid-way; on shutdown the
            # process drains first, so this only ever waits for one batch.
            # One at a time, even if run() were started twice: the inference
            # thread runs one pass after the other.
            outputs = await INFERENCE_THREAD.run(
                lambda: self.engine.forward(encoded, want_tokens=want_tokens)
            )
        except Exception as exc:
            self._on_health(False)
            for job in batch:
                job.error = exc
                job.done.set()
            self.metrics.inc("te_request_failure", len(batch), err="inference")
            return
        self._on_health(True)
        end = time.perf_counter_ns()
        self._passes += 1
        self._entries += len(batch)
        self.gathering.pass_took((end - start) / 1e9)
        self.gathering.answered(len(batch), trio.current_time())
        for row, job in enumerate(batch):
            job.outputs = outputs
            job.row = row
            job.queue_ns = start - job.enqueued_ns
            job.inference_ns = end - start
            job.done.set()
