"""TEI-style batching: one FIFO queue, batches cut by a token budget, inference in a thread.

Requests from every client go into one queue (`Batcher.submit`). The batching
task takes entries in arrival order while the batch's padded size, the longest
entry times the entry count, stays within ``max_batch_tokens`` and the count
within ``max_batch_requests``, runs the batch through the model in a worker
thread, and hands each entry its row. While a batch runs, new arrivals queue up
and form the next one, so batches grow with load. Entries whose caller went
away before their batch started are dropped, never computed.

The queue is bounded by ``--max-concurrent-requests``: callers take a permit
(`Batcher.permits`) before submitting and keep it until their result is back,
so at most that many entries are queued or running. Unary calls take one with
``acquire_nowait`` (RESOURCE_EXHAUSTED when none is left), streams wait.

Only one batch runs at a time: PyTorch already spreads one forward pass over
all cores, and a second concurrent pass would only fight it for them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .engine import Encoded, Engine, Outputs
from .metrics import Metrics

__all__ = ["BatchError", "Batcher", "Job"]


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
        # One inference at a time, even if run() were started twice.
        self._inference = trio.CapacityLimiter(1)

    @property
    def queued(self) -> int:
        """Entries waiting for a batch."""
        return len(self._queue)

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
            outputs = await trio.to_thread.run_sync(
                lambda: self.engine.forward(encoded, want_tokens=want_tokens),
                limiter=self._inference,
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
