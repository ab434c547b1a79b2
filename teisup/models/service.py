"""The model registry running: discovery, downloads and smoke tests carried out.

`ModelService` is a supervised worker (``run``) that owns the tasks of the
downloads and smoke tests, so a client that hangs up does not cut a download
off halfway; the REST handlers start them and wait for their outcome. The
decisions are `ModelRegistry`'s, the files `teisup.models.cache`'s, the
network `Downloader`'s, the instance `Loader`'s: each injected.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..supervision import ChildContext
from . import cache
from .download import Downloader, DownloadError
from .registry import (
    CachedModel,
    ModelInfo,
    ModelRegistry,
    ModelStatus,
    Progress,
)
from .smoke import Loader

__all__ = ["DownloadFailed", "ModelService", "RegistryStopped"]

logger = logging.getLogger("teisup.models")

T = TypeVar("T")


class RegistryStopped(RuntimeError):
    """The registry's worker is not running (starting, restarting or stopping)."""

    def __init__(self) -> None:
        super().__init__("the model registry is not running; try again")


class DownloadFailed(Exception):
    """A download did not complete; ``info`` is the model after it."""

    def __init__(self, info: ModelInfo, reason: str) -> None:
        super().__init__(f"Failed to download model '{info.model_id}': {reason}")
        self.info = info


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class ModelService:
    """The registry of models and the work on them; ``run`` it as a supervised child."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        downloader: Downloader,
        loader: Loader,
        configured: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        scan: Callable[[Path], list[CachedModel]] = cache.scan,
        look_up: Callable[[Path, str], CachedModel | None] = cache.cached_model,
    ) -> None:
        self.cache_dir = cache_dir
        self.registry = ModelRegistry()
        self._downloader = downloader
        self._loader = loader
        self._configured = list(configured)
        self._clock = clock
        self._scan = scan
        self._look_up = look_up
        self._nursery: trio.Nursery | None = None
        #: Finished downloads by outcome, for /metrics.
        self.downloads: Counter[str] = Counter()
        self._logged_step: dict[str, int] = {}

    # -- the worker ------------------------------------------------------------

    async def run(self, ctx: ChildContext) -> None:
        """The ``models`` worker of the root supervisor: `serve` until asked to stop."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve)
            ctx.started()
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover the cache, register the configured models, then run the work started."""
        removed = await trio.to_thread.run_sync(cache.clean_staging, self.cache_dir)
        if removed:
            logger.warning(
                "removed %d unfinished download(s) from %s", len(removed), self.cache_dir
            )
        await self._loader.forget_leftovers()
        found = await trio.to_thread.run_sync(self._scan, self.cache_dir)
        now = self._clock()
        for model_id in self._configured:
            self.registry.register(model_id, now)
        self.registry.observe_cache(found, now)
        logger.info(
            "model registry: %d model(s), %d in the cache %s",
            len(self.registry),
            len(found),
            self.cache_dir,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _in_worker(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in the worker's nursery and wait for it: the caller may go, it stays."""
        nursery = self._running()
        done = trio.Event()
        outcome: list[T] = []
        failure: list[BaseException] = []

        async def job() -> None:
            try:
                outcome.append(await work())
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        nursery.start_soon(job)
        await done.wait()
        if failure:
            raise failure[0]
        if not outcome:
            raise RegistryStopped  # the worker stopped (or restarted) under the job
        return outcome[0]

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise RegistryStopped
        return self._nursery

    # -- what the API calls ----------------------------------------------------

    async def register(self, model_id: str) -> tuple[ModelInfo, bool]:
        """Register ``model_id`` (its files found if cached); ``(info, created)``."""
        info, created = self.registry.register(model_id, self._clock())
        if created:
            await self._refresh(model_id)
            info = self.registry.get(model_id)
            logger.info("model %s registered (%s)", model_id, info.status.value)
        return info, created

    async def get(self, model_id: str) -> ModelInfo:
        """The model, its files looked at again."""
        self.registry.get(model_id)  # ModelNotFound before any disk access
        await self._refresh(model_id)
        return self.registry.get(model_id)

    def all(self) -> list[ModelInfo]:
        return self.registry.all()

    async def _refresh(self, model_id: str) -> None:
        found = await trio.to_thread.run_sync(self._look_up, self.cache_dir, model_id)
        self.registry.observe_one(model_id, found)

    async def download(self, model_id: str) -> ModelInfo:
        """Have ``model_id``'s files in the cache; the model once they are.

        Already downloaded: at once, nothing fetched. Raises `ModelNotFound`,
        `ModelBusy`, `RegistryStopped`, or `DownloadFailed` (the model then says why).
        """
        await self.get(model_id)
        if self.registry.cached(model_id) is not None:
            return self.registry.get(model_id)
        self._running()  # before the model is marked: nothing would run the download
        self.registry.begin_download(model_id)
        self._logged_step[model_id] = -1
        logger.info("downloading model %s into %s", model_id, self.cache_dir)

        def report(done: int, total: int | None, files: int, files_total: int | None) -> None:
            self._on_progress(model_id, done, total, files, files_total)

        async def work() -> ModelInfo:
            try:
                cached = await self._downloader.download(model_id, report)
            except DownloadError as exc:
                self.downloads["failed"] += 1
                info = self.registry.fail_download(model_id, str(exc))
                logger.error("download of model %s failed: %s", model_id, exc)
                raise DownloadFailed(info, str(exc)) from None
            except BaseException:
                self.registry.fail_download(model_id, "interrupted")
                raise
            self.downloads["completed"] += 1
            info = self.registry.finish_download(model_id, cached)
            logger.info(
                "model %s downloaded: %s in %s", model_id, _human(cached.size_bytes), cached.path
            )
            return info

        return await self._in_worker(work)

    def _on_progress(
        self, model_id: str, done: int, total: int | None, files: int, files_total: int | None
    ) -> None:
        if self.registry.get(model_id).status is not ModelStatus.DOWNLOADING:
            return
        progress = self.registry.download_progress(
            model_id,
            bytes_downloaded=done,
            bytes_total=total,
            files_downloaded=files,
            files_total=files_total,
        )
        self._log_progress(model_id, progress)

    def _log_progress(self, model_id: str, progress: Progress) -> None:
        """One log line per tenth of the way."""
        if progress.percent is None:
            return
        step = int(progress.percent // 10)
        if step <= self._logged_step.get(model_id, -1):
            return
        self._logged_step[model_id] = step
        logger.info(
            "downloading model %s: %.0f%% (%s of %s, %d of %s files)",
            model_id,
            progress.percent,
            _human(progress.bytes_downloaded),
            _human(progress.bytes_total or 0),
            progress.files_downloaded,
            progress.files_total,
        )

    async def load(self, model_id: str) -> ModelInfo:
        """Smoke-test ``model_id``: start it, embed once, stop it; the model with the outcome.

        A failed test is an answer, not an error (``status: failed`` and
        ``verification_error``, as tei-manager). Raises `ModelNotFound`,
        `ModelBusy`, `ModelNotDownloaded`.
        """
        await self.get(model_id)
        self._running()
        self.registry.begin_load(model_id)
        logger.info("smoke test of model %s: starting an instance", model_id)

        async def work() -> ModelInfo:
            error: str | None = "interrupted"
            try:
                error = await self._loader.smoke_test(model_id)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                info = self.registry.finish_load(model_id, error, self._clock())
            if error is None:
                logger.info("smoke test of model %s passed", model_id)
            else:
                logger.warning("smoke test of model %s failed: %s", model_id, error)
            return info

        return await self._in_worker(work)

    # -- metrics ---------------------------------------------------------------

    def collector(self) -> Collector:
        """The registry's series for /metrics, read at scrape time."""
        return _ModelCollector(self)


class _ModelCollector(Collector):
    def __init__(self, service: ModelService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        return list(self._series())

    def _series(self) -> Iterator[Metric]:
        models = self._service.all()
        by_status = GaugeMetricFamily(
            "teisup_models", "Registered models by status", labels=["status"]
        )
        counts = Counter(info.status for info in models)
        for status in ModelStatus:
            by_status.add_metric([status.value], counts[status])
        yield by_status
        done = GaugeMetricFamily(
            "teisup_model_download_bytes",
            "Bytes of the running or last download of each model",
            labels=["model"],
        )
        total = GaugeMetricFamily(
            "teisup_model_download_total_bytes",
            "Size of the running or last download of each model (when known)",
            labels=["model"],
        )
        ratio = GaugeMetricFamily(
            "teisup_model_download_progress_ratio",
            "How far the running or last download of each model is, 0 to 1",
            labels=["model"],
        )
        for info in models:
            progress = info.progress
            if progress is None:
                continue
            done.add_metric([info.model_id], progress.bytes_downloaded)
            if progress.bytes_total is not None:
                total.add_metric([info.model_id], progress.bytes_total)
            if progress.percent is not None:
                ratio.add_metric([info.model_id], progress.percent / 100)
        yield done
        yield total
        yield ratio
        finished = CounterMetricFamily(
            "teisup_model_downloads", "Finished downloads by outcome", labels=["outcome"]
        )
        for outcome in ("completed", "failed"):
            finished.add_metric([outcome], self._service.downloads[outcome])
        yield finished
