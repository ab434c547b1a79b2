"""`ModelRegistry`: the model states and what each allows, with no I/O."""

from __future__ import annotations

import msgspec
import pytest

from teisup.models import (
    CachedModel,
    InvalidModelId,
    ModelBusy,
    ModelMetadata,
    ModelNotDownloaded,
    ModelNotFound,
    ModelRegistry,
    ModelStatus,
    TooManyModels,
    check_model_id,
)

MODEL = "BAAI/bge-small-en-v1.5"
FILES = CachedModel(
    MODEL, "/cache/models--BAAI--bge-small-en-v1.5/snapshots/abc", 123, ModelMetadata()
)


def test_register_once_then_the_existing_entry() -> None:
    registry = ModelRegistry()
    info, created = registry.register(MODEL, now=0.0)
    assert created
    assert (info.status, info.downloaded, info.added_at) == (
        ModelStatus.AVAILABLE,
        False,
        "1970-01-01T00:00:00Z",
    )
    again, created = registry.register(MODEL, now=99.0)
    assert not created
    assert again == info


@pytest.mark.parametrize(
    "model_id",
    ["", "/x", "a/b/c", "../etc", "a b", "-a", "a--b", "a..b", "x" * 97, "a/", "é/x", "a\n"],
)
def test_ids_that_are_not_hub_ids_are_refused(model_id: str) -> None:
    with pytest.raises(InvalidModelId):
        check_model_id(model_id)
    with pytest.raises(InvalidModelId):
        ModelRegistry().register(model_id, now=0.0)


@pytest.mark.parametrize("model_id", ["bert-base-uncased", MODEL, "org/x.y_z-1", "a" * 96])
def test_hub_ids_are_accepted(model_id: str) -> None:
    assert check_model_id(model_id) == model_id


def test_the_registry_is_bounded() -> None:
    registry = ModelRegistry(max_models=2)
    registry.register("a", 0.0)
    registry.register("b", 0.0)
    with pytest.raises(TooManyModels):
        registry.register("c", 0.0)
    assert registry.register("a", 0.0)[1] is False  # a known one still answers


def test_unknown_models_are_not_found() -> None:
    registry = ModelRegistry()
    for call in (registry.get, registry.begin_download, registry.begin_load):
        with pytest.raises(ModelNotFound, match="not found"):
            call(MODEL)


def test_a_download_goes_downloading_with_progress_then_downloaded() -> None:
    registry = ModelRegistry()
    registry.register(MODEL, 0.0)
    assert registry.begin_download(MODEL).status is ModelStatus.DOWNLOADING
    progress = registry.download_progress(
        MODEL, bytes_downloaded=25, bytes_total=200, files_downloaded=1, files_total=4
    )
    assert (progress.percent, registry.get(MODEL).progress) == (12.5, progress)
    # One at a time: neither a second download nor a smoke test meanwhile.
    with pytest.raises(ModelBusy, match="downloading"):
        registry.begin_download(MODEL)
    with pytest.raises(ModelBusy):
        registry.begin_load(MODEL)
    info = registry.finish_download(MODEL, FILES)
    assert (info.status, info.downloaded, info.cache_path) == (
        ModelStatus.DOWNLOADED,
        True,
        FILES.path,
    )
    assert info.progress is not None
    assert (info.progress.percent, info.progress.bytes_downloaded) == (100.0, 200)


def test_a_failed_download_is_failed_and_not_downloaded_and_may_be_retried() -> None:
    registry = ModelRegistry()
    registry.register(MODEL, 0.0)
    registry.begin_download(MODEL)
    info = registry.fail_download(MODEL, "502 from the Hub")
    assert (info.status, info.downloaded, info.download_error) == (
        ModelStatus.FAILED,
        False,
        "502 from the Hub",
    )
    registry.begin_download(MODEL)
    assert registry.get(MODEL).download_error is None
    assert registry.finish_download(MODEL, FILES).status is ModelStatus.DOWNLOADED


def test_a_smoke_test_needs_the_files_and_ends_verified_or_failed() -> None:
    registry = ModelRegistry()
    registry.register(MODEL, 0.0)
    with pytest.raises(ModelNotDownloaded, match="/download first"):
        registry.begin_load(MODEL)
    registry.observe_one(MODEL, FILES)
    assert registry.begin_load(MODEL).status is ModelStatus.LOADING
    with pytest.raises(ModelBusy, match="loading"):
        registry.begin_download(MODEL)
    failed = registry.finish_load(MODEL, "CUDA error: out of memory", now=60.0)
    assert (failed.status, failed.verification_error, failed.last_verified) == (
        ModelStatus.FAILED,
        "CUDA error: out of memory",
        "1970-01-01T00:01:00Z",
    )
    # A failed smoke test stays failed when the cache is looked at again.
    registry.observe_one(MODEL, FILES)
    assert registry.get(MODEL).status is ModelStatus.FAILED
    registry.begin_load(MODEL)
    verified = registry.finish_load(MODEL, None, now=120.0)
    assert (verified.status, verified.verification_error) == (ModelStatus.VERIFIED, None)


def test_the_cache_decides_what_is_downloaded() -> None:
    registry = ModelRegistry()
    other = CachedModel("org/other", "/cache/other", 5, ModelMetadata(hidden_size=8))
    registry.register(MODEL, 0.0)
    registry.observe_cache([other], now=1.0)
    # Discovered models are registered; the order is by id.
    assert [(i.model_id, i.status) for i in registry.all()] == [
        (MODEL, ModelStatus.AVAILABLE),
        ("org/other", ModelStatus.DOWNLOADED),
    ]
    # Files deleted from the cache meanwhile: no longer downloaded.
    registry.observe_cache([], now=2.0)
    assert registry.get("org/other").status is ModelStatus.AVAILABLE
    # Not while a download runs: its files are not in yet.
    registry.begin_download(MODEL)
    registry.observe_one(MODEL, None)
    assert registry.get(MODEL).status is ModelStatus.DOWNLOADING


def test_model_info_leaves_absent_keys_out_as_tei_manager() -> None:
    registry = ModelRegistry()
    registry.register(MODEL, 0.0)
    assert msgspec.to_builtins(registry.get(MODEL)) == {
        "model_id": MODEL,
        "status": "available",
        "downloaded": False,
        "added_at": "1970-01-01T00:00:00Z",
    }
