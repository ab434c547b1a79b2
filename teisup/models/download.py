"""Downloads from the Hub (huggingface_hub's `snapshot_download`), as a thin shell.

`HubDownloader` runs `snapshot_download` in a worker thread into a staging
cache, reports its progress into the Trio thread, and moves the finished
snapshot into the real cache (`teisup.models.cache.commit_staged`). The
endpoint is huggingface_hub's: ``HF_ENDPOINT`` (a mirror, or a test's
loopback Hub), and the token ``HF_TOKEN``, both read by huggingface_hub.

`Downloader` is the seam: the registry service takes any object with this
method, so its tests run in virtual time without a network.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import tqdm
import trio

from .cache import commit_staged, new_staging
from .registry import CachedModel

__all__ = ["Downloader", "DownloadError", "HubDownloader", "ProgressReport"]

logger = logging.getLogger("teisup.models")

#: ``(bytes_downloaded, bytes_total, files_downloaded, files_total)``, in the Trio thread.
ProgressReport = Callable[[int, int | None, int, int | None], None]


class DownloadError(Exception):
    """A download did not complete; the message says why (the Hub's answer, the network)."""


class Downloader(Protocol):
    """Fetches a model into the hub cache, reporting progress; the cached model once complete."""

    async def download(self, model_id: str, report: ProgressReport) -> CachedModel: ...


class _Sink:
    """A file that drops what tqdm writes (its bars are only counters here)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _Stopped(Exception):
    """Raised inside huggingface_hub's threads once their download was given up."""


class _Counter:
    """Bytes and files done, updated from huggingface_hub's threads, pushed to Trio.

    A push happens when a file completes or at least every 1% of the bytes,
    so a large model does not flood the Trio thread. Once `stopped` is set,
    the next update raises `_Stopped`, which ends the download at its next
    chunk.
    """

    def __init__(self, report: ProgressReport, token: trio.lowlevel.TrioToken) -> None:
        self._report = report
        self._token = token
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.files_done = 0
        self.files_total: int | None = None
        self._last_pushed = -1

    def plan(self, bytes_total: int, files_total: int) -> None:
        with self._lock:
            self.bytes_total, self.files_total = bytes_total, files_total
        self._push(force=True)

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n
        self._push(force=False)

    def add_file(self) -> None:
        with self._lock:
            self.files_done += 1
        self._push(force=True)

    def _push(self, *, force: bool) -> None:
        with self._lock:
            done, total = self.bytes_done, self.bytes_total
            step = max(1, (total or 0) // 100)
            if not force and self._last_pushed >= 0 and done - self._last_pushed < step:
                return
            self._last_pushed = done
            values = (done, total, self.files_done, self.files_total)
        # RunFinishedError, Cancelled: the manager is stopping; the staged files
        # are cleaned at its next start.
        with contextlib.suppress(trio.RunFinishedError, trio.Cancelled):
            trio.from_thread.run_sync(self._report, *values, trio_token=self._token)


def _bar_class(counter: _Counter) -> type[Any]:
    """A tqdm class that counts into ``counter`` and draws nothing."""

    class Bar(tqdm.tqdm):  # type: ignore[misc]  # tqdm has no type hints
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            # Disabled bars do not count: keep it enabled, drawing into a sink.
            kwargs.update(disable=False, file=_Sink(), mininterval=3600.0, delay=0)
            super().__init__(*args, **kwargs)
            desc = str(kwargs.get("desc") or "")
            #: The bytes written to disk, summed over files; the files done.
            self._kind = (
                "bytes" if desc.startswith("Reconstructing") else
                "files" if desc.startswith("Fetching") else None
            )  # fmt: skip

        def update(self, n: float | None = 1) -> bool | None:
            if counter.stopped.is_set():
                raise _Stopped
            result: bool | None = super().update(n)
            if self._kind == "bytes":
                counter.add_bytes(int(n or 0))
            elif self._kind == "files":
                counter.add_file()
            return result

    return Bar


class HubDownloader:
    """`Downloader` over huggingface_hub, into the hub cache at ``cache``."""

    def __init__(
        self,
        cache: Path,
        *,
        endpoint: str | None = None,
        revision: str = "main",
        max_workers: int = 8,
    ) -> None:
        """``endpoint``: the Hub's URL; None for huggingface_hub's (``HF_ENDPOINT``)."""
        self.cache = cache
        self.endpoint = endpoint
        self.revision = revision
        self.max_workers = max_workers
        # Downloads given up while their thread still ran: each thread removes
        # its own staging directory when it ends (removing it under its feet
        # made huggingface_hub's threads fail in their temporary files).
        self._abandoned = 0
        self._abandoned_done = threading.Condition()

    def join_abandoned(self, timeout: float) -> bool:
        """Block until every given-up download's thread has ended; False on timeout.

        Blocking: call it in a thread. A given-up download stops at its next
        chunk, so this waits only for requests already on the wire.
        """
        with self._abandoned_done:
            return self._abandoned_done.wait_for(lambda: self._abandoned == 0, timeout)

    def _count_abandoned(self) -> None:
        with self._abandoned_done:
            self._abandoned += 1

    def _fetch_staged(
        self, model_id: str, staging: Path, counter: _Counter, handoff: _Handoff
    ) -> None:
        """`_fetch`, then, if the Trio side gave up waiting meanwhile, remove ``staging``."""
        try:
            self._fetch(model_id, staging, counter)
        finally:
            if handoff.thread_ended():
                shutil.rmtree(staging, ignore_errors=True)
                with self._abandoned_done:
                    self._abandoned -= 1
                    self._abandoned_done.notify_all()

    def _fetch(self, model_id: str, staging: Path, counter: _Counter) -> None:
        from huggingface_hub import snapshot_download  # imports the HTTP stack: only when used

        try:
            plan = snapshot_download(
                model_id,
                revision=self.revision,
                cache_dir=staging,
                endpoint=self.endpoint,
                dry_run=True,
            )
            counter.plan(sum(f.file_size or 0 for f in plan), len(plan))
            snapshot_download(
                model_id,
                revision=self.revision,
                cache_dir=staging,
                endpoint=self.endpoint,
                tqdm_class=_bar_class(counter),
                max_workers=self.max_workers,
            )
        except _Stopped:
            raise DownloadError("the download was given up") from None
        except Exception as exc:  # whatever the client raises, the download failed
            raise DownloadError(_reason(exc)) from exc

    async def download(self, model_id: str, report: ProgressReport) -> CachedModel:
        """Fetch ``model_id`` whole into the cache, or raise `DownloadError`.

        Nothing reaches the cache before every file is in: a failure, a
        cancellation or a killed process leaves only the staging directory,
        which `teisup.models.cache.clean_staging` removes.
        """
        staging = await trio.to_thread.run_sync(new_staging, self.cache)
        counter = _Counter(report, trio.lowlevel.current_trio_token())
        handoff = _Handoff()
        abandoned = False
        try:
            try:
                # Abandoned on cancellation: the thread cannot be interrupted; it
                # stops at its next chunk, and what it still writes goes to the
                # staging directory only, which it then removes itself.
                await trio.to_thread.run_sync(
                    self._fetch_staged, model_id, staging, counter, handoff, abandon_on_cancel=True
                )
            except BaseException:
                counter.stopped.set()
                abandoned = handoff.give_up(self._count_abandoned)
                raise
            try:
                return await trio.to_thread.run_sync(commit_staged, staging, self.cache, model_id)
            except OSError as exc:
                raise DownloadError(f"cannot move the download into the cache: {exc}") from exc
        finally:
            if not abandoned:  # else the thread removes it as it ends
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, staging, True)


class _Handoff:
    """Who removes a staging directory: the Trio side, or a thread it gave up on.

    Exactly one of `thread_ended` (in the thread, as it ends) and `give_up`
    (in Trio, on cancellation) comes first; the one that comes second owns
    the removal if the thread is still running.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended = False
        self._given_up = False

    def thread_ended(self) -> bool:
        """The thread is ending: True if it was given up and must clean up itself."""
        with self._lock:
            self._ended = True
            return self._given_up

    def give_up(self, while_running: Callable[[], None]) -> bool:
        """Trio stops waiting: True if the thread still runs (and will clean up).

        ``while_running`` is called first in that case, before the thread can end.
        """
        with self._lock:
            self._given_up = True
            if not self._ended:
                while_running()
            return not self._ended


def _reason(exc: BaseException) -> str:
    """The cause's first line: huggingface_hub wraps the Hub's answer in its own errors."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
