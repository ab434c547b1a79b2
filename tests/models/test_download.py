"""`HubDownloader`: huggingface_hub's real client against the loopback Hub, into a real cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from teisup.embedded.models import resolve_model
from teisup.models import DownloadError, HubDownloader
from teisup.models.cache import STAGING_DIR, cached_model, clean_staging, repo_folder, scan

from .conftest import TINY, WEIGHTS
from .hub import LoopbackHub

Report = tuple[int, int | None, int, int | None]


def ignore(*report: object) -> None:
    pass


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


async def test_a_download_lands_whole_with_progress_and_the_backend_resolves_it(
    hub: LoopbackHub, tiny_model: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    reports: list[Report] = []
    downloader = HubDownloader(cache, endpoint=hub.url)

    model = await downloader.download(TINY, lambda *r: reports.append(r))

    sizes = file_sizes(tiny_model)
    total = sum(sizes.values())
    # Progress: the plan first, bytes and files growing, everything at the end.
    assert reports[0] == (0, total, 0, len(sizes))
    assert reports[-1] == (total, total, len(sizes), len(sizes))
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)
    assert any(0 < r[0] < total for r in reports)  # seen part of the way, not only the ends
    # The snapshot is in the real cache, the staging directory gone.
    assert model.model_id == TINY
    assert Path(model.path).parent == cache / repo_folder(TINY) / "snapshots"
    assert model.size_bytes == total
    assert (model.metadata.hidden_size, model.metadata.model_type) == (32, "bert")
    assert list((cache / STAGING_DIR).iterdir()) == []
    assert (cache / repo_folder(TINY) / "refs" / "main").read_text() == hub.commit(TINY)
    assert scan(cache) == [model]
    # The embedded backend finds it offline, where TEI would.
    resolved = resolve_model(TINY, env={"HF_HUB_CACHE": str(cache)})
    assert (resolved.source, str(resolved.path)) == ("hub-cache", model.path)
    assert (resolved.path / WEIGHTS).read_bytes() == (tiny_model / WEIGHTS).read_bytes()


async def test_a_download_cut_halfway_leaves_nothing_that_looks_complete(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    hub.cut.add(WEIGHTS)
    with pytest.raises(DownloadError):
        await HubDownloader(cache, endpoint=hub.url).download(TINY, ignore)
    assert cached_model(cache, TINY) is None
    assert scan(cache) == []
    assert not (cache / repo_folder(TINY)).exists()
    assert list((cache / STAGING_DIR).iterdir()) == []
    with pytest.raises(Exception, match="not available offline"):
        resolve_model(TINY, env={"HF_HUB_CACHE": str(cache)})


async def test_an_unknown_repository_is_a_download_error_naming_it(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match=r"(?i)not found|404"):
        await HubDownloader(tmp_path, endpoint=hub.url).download("nobody/none", ignore)
    assert scan(tmp_path) == []


async def test_a_cancelled_download_leaves_only_staging_which_the_next_start_removes(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    hub.held.add(WEIGHTS)
    downloader = HubDownloader(cache, endpoint=hub.url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(downloader.download, TINY, ignore)
        await trio.to_thread.run_sync(hub.holding.wait, 60)
        nursery.cancel_scope.cancel()
    assert cached_model(cache, TINY) is None
    assert not (cache / repo_folder(TINY)).exists()
    # The given-up thread ends once its request is answered, and removes its
    # own staging directory, which nobody removed under its feet meanwhile.
    assert [p.name.split("-")[0] for p in (cache / STAGING_DIR).iterdir()] == [str(os.getpid())]
    hub.release()
    assert await trio.to_thread.run_sync(downloader.join_abandoned, 60)
    assert list((cache / STAGING_DIR).iterdir()) == []
    assert cached_model(cache, TINY) is None
    # What a killed process leaves (a staging directory of a pid no longer alive).
    leftover = cache / STAGING_DIR / "999999999-dead"
    (leftover / repo_folder(TINY) / "blobs").mkdir(parents=True)
    assert leftover in clean_staging(cache)
    assert not leftover.exists()
    # One of a live process (another manager sharing the cache) is kept.
    live = cache / STAGING_DIR / f"{os.getppid()}-live"
    live.mkdir()
    assert live not in clean_staging(cache)
    assert live.exists()
