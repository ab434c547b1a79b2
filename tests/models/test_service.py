"""`ModelService` with its seams (downloader, loader, cache scan) in virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from teisup.models import (
    CachedModel,
    DownloadError,
    DownloadFailed,
    InstanceSmokeTest,
    ModelBusy,
    ModelMetadata,
    ModelNotDownloaded,
    ModelService,
    ModelStatus,
    ProgressReport,
    RegistryStopped,
    smoke_instance_name,
)

MODEL = "org/model"
CACHE = Path("/nonexistent/hub")


def cached(model_id: str) -> CachedModel:
    return CachedModel(model_id, f"/cache/{model_id}", 100, ModelMetadata(hidden_size=4))


class FakeDownloader:
    """Reports half the bytes, then waits for `finish` (or fails if told to)."""

    def __init__(self) -> None:
        self.halfway = trio.Event()
        self.finish = trio.Event()
        self.error: str | None = None
        self.calls = 0
        self.completed = 0
        #: What it put in the (fake) cache.
        self.done: dict[str, CachedModel] = {}

    async def download(self, model_id: str, report: ProgressReport) -> CachedModel:
        self.calls += 1
        report(0, 100, 0, 2)
        await trio.sleep(1)
        report(50, 100, 1, 2)
        self.halfway.set()
        await self.finish.wait()
        if self.error is not None:
            raise DownloadError(self.error)
        report(100, 100, 2, 2)
        self.completed += 1
        self.done[model_id] = cached(model_id)
        return self.done[model_id]


class FakeLoader:
    def __init__(self, answer: str | Exception | None = None) -> None:
        self.answer = answer
        self.tested: list[str] = []
        self.forgot = False

    async def forget_leftovers(self) -> list[str]:
        self.forgot = True
        return []

    async def smoke_test(self, model_id: str) -> str | None:
        self.tested.append(model_id)
        await trio.sleep(30)  # an instance loading, in virtual time
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def running(service: ModelService, nursery: trio.Nursery) -> ModelService:
    await nursery.start(service.serve)
    return service


def service_with(
    downloader: FakeDownloader | None = None,
    loader: FakeLoader | None = None,
    in_cache: list[CachedModel] | None = None,
) -> ModelService:
    found = {m.model_id: m for m in in_cache or []}
    downloader = downloader or FakeDownloader()
    return ModelService(
        CACHE,
        downloader=downloader,
        loader=loader or FakeLoader(),
        configured=[MODEL],
        clock=lambda: 1000.0,
        scan=lambda cache: list(found.values()),
        look_up=lambda cache, model_id: found.get(model_id) or downloader.done.get(model_id),
    )


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_start_up_registers_the_configured_and_the_cached_models(
    nursery: trio.Nursery,
) -> None:
    service = await running(service_with(in_cache=[cached("org/found")]), nursery)
    assert [(m.model_id, m.status) for m in service.all()] == [
        ("org/found", ModelStatus.DOWNLOADED),
        (MODEL, ModelStatus.AVAILABLE),
    ]


async def test_a_download_shows_progress_refuses_a_second_and_outlives_its_caller(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    downloader = FakeDownloader()
    service = await running(service_with(downloader), nursery)
    with trio.move_on_after(0.5):  # a client that hangs up early
        await service.download(MODEL)
    await downloader.halfway.wait()
    info = await service.get(MODEL)
    assert info.status is ModelStatus.DOWNLOADING
    assert info.progress is not None
    assert (info.progress.bytes_downloaded, info.progress.percent) == (50, 50.0)
    with pytest.raises(ModelBusy):
        await service.download(MODEL)
    with pytest.raises(ModelBusy):
        await service.load(MODEL)
    metrics = scrape(service)
    assert 'teisup_model_download_bytes{model="org/model"} 50.0' in metrics
    assert 'teisup_model_download_progress_ratio{model="org/model"} 0.5' in metrics
    assert 'teisup_models{status="downloading"} 1.0' in metrics
    downloader.finish.set()
    # The download went on without its first caller; a new one sees it done.
    await trio.testing.wait_all_tasks_blocked()
    assert downloader.completed == 1
    done = await service.download(MODEL)
    assert (done.status, done.downloaded, downloader.calls) == (ModelStatus.DOWNLOADED, True, 1)
    assert 'teisup_model_downloads_total{outcome="completed"} 1.0' in scrape(service)


async def test_a_failed_download_raises_and_leaves_the_model_failed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    downloader = FakeDownloader()
    downloader.error = "HTTPError: 503 from the Hub"
    downloader.finish.set()
    service = await running(service_with(downloader), nursery)
    with pytest.raises(DownloadFailed, match="503 from the Hub") as failed:
        await service.download(MODEL)
    assert failed.value.info.status is ModelStatus.FAILED
    info = await service.get(MODEL)
    assert (info.status, info.downloaded, info.download_error) == (
        ModelStatus.FAILED,
        False,
        "HTTPError: 503 from the Hub",
    )
    assert 'teisup_model_downloads_total{outcome="failed"} 1.0' in scrape(service)


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (None, ModelStatus.VERIFIED, None),
        ("Unsupported model", ModelStatus.FAILED, "Unsupported model"),
        (RuntimeError("spawn failed"), ModelStatus.FAILED, "RuntimeError: spawn failed"),
    ],
)
async def test_a_smoke_test_answers_verified_or_failed(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    answer: str | Exception | None,
    status: ModelStatus,
    error: str | None,
) -> None:
    loader = FakeLoader(answer)
    service = await running(service_with(loader=loader, in_cache=[cached(MODEL)]), nursery)
    info = await service.load(MODEL)
    assert (info.status, info.verification_error, loader.tested) == (status, error, [MODEL])
    assert info.last_verified == "1970-01-01T00:16:40Z"


async def test_a_smoke_test_of_a_model_not_downloaded_is_refused(
    nursery: trio.Nursery,
) -> None:
    loader = FakeLoader()
    service = await running(service_with(loader=loader), nursery)
    with pytest.raises(ModelNotDownloaded):
        await service.load(MODEL)
    assert loader.tested == []


def scrape(service: ModelService) -> str:
    registry = CollectorRegistry()
    registry.register(service.collector())
    return generate_latest(registry).decode()


class _Manager:
    """The instance manager as `InstanceSmokeTest.forget_leftovers` uses it."""

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self.deleted: list[str] = []

    def names(self) -> list[str]:
        return list(self._names)

    async def delete(self, name: str) -> None:
        self.deleted.append(name)


async def test_smoke_test_instances_an_earlier_run_left_are_deleted_at_start_up(
    nursery: trio.Nursery,
) -> None:
    leftover = smoke_instance_name(MODEL)
    manager = _Manager(["bge-small", leftover, "model-load-mine"])
    smoke = InstanceSmokeTest(manager, subscribe=lambda: None)  # type: ignore[arg-type]
    assert await smoke.forget_leftovers() == [leftover]
    # A user's instance that merely starts like one is kept.
    assert manager.deleted == [leftover]
    loader = FakeLoader()
    await running(service_with(loader=loader), nursery)
    assert loader.forgot


async def test_work_asked_of_a_stopped_registry_is_refused_and_leaves_the_model_as_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downloader = FakeDownloader()
    service = service_with(downloader, in_cache=[cached("org/found")])
    service.registry.register(MODEL, 0.0)
    service.registry.observe_cache([cached("org/found")], 0.0)
    # Not running yet: refused before the model is marked.
    with pytest.raises(RegistryStopped):
        await service.download(MODEL)
    with pytest.raises(RegistryStopped):
        await service.load("org/found")
    assert service.registry.get(MODEL).status is ModelStatus.AVAILABLE

    # Stopped under a running download: the caller hears it, the model is free again.
    async with trio.open_nursery() as outer:
        worker = trio.CancelScope()

        async def run_worker(*, task_status: trio.TaskStatus[None]) -> None:
            with worker:
                await service.serve(task_status=task_status)

        # Until it serves: its start-up reads the cache in a thread, which
        # wait_all_tasks_blocked would count as blocked.
        await outer.start(run_worker)
        async with trio.open_nursery() as calls:

            async def call() -> None:
                with pytest.raises(RegistryStopped):
                    await service.download(MODEL)

            calls.start_soon(call)
            await downloader.halfway.wait()
            worker.cancel()
    info = service.registry.get(MODEL)
    assert (info.status, info.downloaded, info.download_error) == (
        ModelStatus.FAILED,
        False,
        "interrupted",
    )
    service.registry.begin_download(MODEL)  # not busy any more
