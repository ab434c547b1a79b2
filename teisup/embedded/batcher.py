"""TEI-style batching: one FIFO queue, batches cut by a token budget, inference in a thread.

Requests from every client go into one queue (`Batcher.submit`). The batching
task takes entries in arrival order while the batch's padded size, the longest
entry times the entry count, stays within ``max_batch_tokens`` and the count
within ``max_batch_requests``, runs the batch through the model in a worker
thread, and hands each entry its row. While a batch runs, new arrivals queue up
and form the next one, so batches grow with load. Every pass runs on the
process's one inference thread (`engine.InferenceThread`). Entries whose
caller went away before their batch started are dropped, never computed.

The queue is bounded by ``--max-concurrent-requests``: callers take a permit
(`Batcher.permits`) before submitting and keep it until their result is back,
so at most that many entries are queued or running. Unary calls take one with
``acquire_nowait`` (RESOURCE_EXHAUSTED when none is left), streams wait.

Only one batch runs at a time: PyTorch already spreads one forward pass over
all cores, and a second concurrent pass would only fight it for them.

When the batcher is idle, the first arrival does not start a batch on its own
at once: it first lets the event loop finish what it is already doing
(`Batcher.gather`, until every other task is blocked), so that a stream's
messages, or a burst of calls, that are being received, parsed and tokenized
right now join the same batch. Without this, a stream of N messages would run
as a batch of one followed by one of N-1, and the batch of one would run while
the rest are parsed, both contending for the cores and the GIL. Gathering
ends as soon as the event loop is idle, so a lone request waits no more than a
scheduler round. Only for a stream that
is likely to send more soon (`OpenStream.expects_more`: a stream that has just
started, or one that has had several answers outstanding at once) does it also
wait up to ``gather_quiet_s`` for the next message, so that a client writing
its requests one by one still fills one batch; a stream used turn by turn
(one request, then its answer) does not wait. Gathering never takes more
than ``gather_max_s``; what does not fit in one batch forms the next.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio
from trio.testing import wait_all_tasks_blocked

from .engine import INFERENCE_THREAD, Encoded, Engine, Outputs
from .metrics import Metrics

__all__ = ["BatchError", "Batcher", "Job", "OpenStream"]


class BatchError(Exception):
    """The batch holding this entry failed in the model (TEI: a Backend error)."""


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
    """A stream whose client may still send inputs, as `Batcher.gather` sees it."""

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
        gather_quiet_s: float = 0.002,
        gather_max_s: float = 0.05,
    ) -> None:
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        self.permits = trio.Semaphore(max_concurrent_requests)
        """Held from before `submit` until the result is back (TEI's semaphore)."""
        self._on_health = on_health
        self._queue: collections.deque[Job] = collections.deque()
        self._arrived = trio.Event()
        self.gather_quiet_s = gather_quiet_s
        """How long an idle batcher waits for an open stream's next message."""
        self.gather_max_s = gather_max_s
        """The longest an idle batcher gathers arrivals before starting a batch."""
        self._streams: set[OpenStream] = set()

    @property
    def queued(self) -> int:
        """Entries waiting for a batch."""
        return len(self._queue)

    @contextlib.contextmanager
    def stream_open(self, stream: OpenStream) -> Iterator[None]:
        """Register ``stream`` while its client may send more inputs (for `gather`)."""
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

    async def gather(self) -> None:
        """Let inputs already on their way reach the queue before a batch is cut.

        Waits until every other task is blocked (the event loop has nothing
        left to do, and no I/O is pending): whatever was being received,
        parsed and tokenized is queued by then. Then, while an open stream
        `OpenStream.expects_more`, waits up to ``gather_quiet_s`` for one more
        arrival and starts over. All within ``gather_max_s``.
        """
        with trio.move_on_after(self.gather_max_s):
            while True:
                await wait_all_tasks_blocked()
                if not any(stream.expects_more for stream in self._streams):
                    return
                self._arrived = trio.Event()
                with trio.move_on_after(self.gather_quiet_s) as quiet:
                    # An arrival, or a stream closing (its last messages may
                    # still be on their way to the queue): look again.
                    await self._arrived.wait()
                if quiet.cancelled_caught:
                    return

    def _next_batch(self) -> list[Job]:
        batch: list[Job] = []
        longest = 0
        while self._queue:
            job = self._queue[0]
            if job.dropped:
                self._queue.popleft()
                self.metrics.inc("te_request_failure", err="dropped")
                continue
            length = len(job.encoded.ids)
            padded = max(longest, length) * (len(batch) + 1)
            if batch and padded > self.max_batch_tokens:
                break
            if self.max_batch_requests is not None and len(batch) >= self.max_batch_requests:
                break
            batch.append(self._queue.popleft())
            longest = max(longest, length)
        self.metrics.set("te_queue_size", len(self._queue))
        return batch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch and run the queue until cancelled."""
        task_status.started()
        while True:
            if not self._queue:
                self._arrived = trio.Event()
                await self._arrived.wait()
                if not self._queue:
                    continue  # woken by a stream closing, not by an arrival
                await self.gather()
            batch = self._next_batch()
            if not batch:
                continue
            await self._run_batch(batch)

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
        for row, job in enumerate(batch):
            job.outputs = outputs
            job.row = row
            job.queue_ns = start - job.enqueued_ns
            job.inference_ns = end - start
            job.done.set()
