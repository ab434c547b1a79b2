"""The model registry as data: which models the manager knows, and where each one is.

Pure: no I/O, no clock of its own (callers pass the time). The shell
(`teisup.models.service`) carries out downloads and smoke tests and reports
back here; this module decides what may happen next and what the API shows.

A model moves ``available`` → ``downloading`` → ``downloaded`` → ``loading``
→ ``verified`` | ``failed`` (tei-manager's states). A download or a smoke
test is refused with `ModelBusy` while another one of the same model runs.
A failed download leaves the model ``failed`` and not ``downloaded``; a
model whose complete snapshot is in the cache is ``downloaded`` whatever
happened before.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

__all__ = [
    "MAX_MODELS",
    "MODEL_ID_PATTERN",
    "CachedModel",
    "InvalidModelId",
    "ModelBusy",
    "ModelInfo",
    "ModelMetadata",
    "ModelNotDownloaded",
    "ModelNotFound",
    "ModelRegistry",
    "ModelStatus",
    "Progress",
    "TooManyModels",
    "check_model_id",
]

#: A Hub repository id: ``name`` or ``namespace/name``, each part letters,
#: digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 96
#: characters (the Hub's own rule; ``--`` and ``..`` are refused by it too).
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
_MODEL_ID = re.compile(MODEL_ID_PATTERN.removesuffix("$") + r"\Z")

#: More registered models than this is a runaway client, not a registry.
MAX_MODELS = 4096


class ModelStatus(enum.Enum):
    """Where a model is (tei-manager's values)."""

    AVAILABLE = "available"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    LOADING = "loading"
    VERIFIED = "verified"
    FAILED = "failed"


class ModelNotFound(LookupError):
    """No model of that id is registered."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"Model '{model_id}' not found")


class ModelBusy(RuntimeError):
    """A download or smoke test of the model is already running."""

    def __init__(self, model_id: str, status: ModelStatus) -> None:
        super().__init__(f"Model '{model_id}' is busy ({status.value})")


class ModelNotDownloaded(RuntimeError):
    """A smoke test of a model whose files are not here."""

    def __init__(self, model_id: str) -> None:
        super().__init__(
            f"Model '{model_id}' not downloaded. Use POST /models/{model_id}/download first."
        )


class InvalidModelId(ValueError):
    """Not a Hub repository id."""


class TooManyModels(ValueError):
    """The registry holds `MAX_MODELS` already."""


def check_model_id(model_id: str) -> str:
    """``model_id`` if it is a Hub repository id, else `InvalidModelId` saying why."""
    if not _MODEL_ID.match(model_id):
        raise InvalidModelId(
            f"invalid model id {model_id!r}: expected 'name' or 'namespace/name' of letters, "
            "digits, '.', '_' and '-' (each part at most 96 characters)"
        )
    if "--" in model_id or ".." in model_id or model_id.endswith((".", "-")):
        raise InvalidModelId(f"invalid model id {model_id!r}: no '--' or '..', no final '.' or '-'")
    return model_id


class ModelMetadata(msgspec.Struct, omit_defaults=True):
    """What a model's ``config.json`` says about it (tei-manager's keys)."""

    model_type: str | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None


class Progress(msgspec.Struct):
    """A download's progress (teisup's, beside tei-manager's fields)."""

    bytes_downloaded: int
    #: None until the file list is known.
    bytes_total: int | None
    files_downloaded: int
    files_total: int | None
    #: 0-100, one decimal; None while the total is unknown.
    percent: float | None


class ModelInfo(msgspec.Struct, omit_defaults=True):
    """A model as ``/models`` shows it: tei-manager's keys (absent ones left out), then teisup's."""

    model_id: str
    status: ModelStatus
    downloaded: bool
    cache_path: str | None = None
    cache_size_bytes: int | None = None
    last_verified: str | None = None
    verification_error: str | None = None
    metadata: ModelMetadata | None = None
    added_at: str | None = None
    #: teisup: the running or last download's progress.
    progress: Progress | None = None
    #: teisup: why the last download failed.
    download_error: str | None = None


@dataclass(frozen=True)
class CachedModel:
    """A complete snapshot of a model in the HuggingFace hub cache."""

    model_id: str
    #: The snapshot directory (what ``--model-id`` resolves to offline).
    path: str
    size_bytes: int
    metadata: ModelMetadata


def _rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class _Entry:
    model_id: str
    added_at: float
    status: ModelStatus = ModelStatus.AVAILABLE
    cached: CachedModel | None = None
    last_verified: float | None = None
    verification_error: str | None = None
    progress: Progress | None = None
    download_error: str | None = None
    #: Set while a download or smoke test runs.
    busy: bool = field(default=False)


def _percent(done: int, total: int | None) -> float | None:
    if total is None:
        return None
    if total <= 0:
        return 100.0
    return round(min(done, total) * 100.0 / total, 1)


class ModelRegistry:
    """Every registered model and its state; all changes go through these methods."""

    def __init__(self, *, max_models: int = MAX_MODELS) -> None:
        self._entries: dict[str, _Entry] = {}
        self._max = max_models

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def register(self, model_id: str, now: float) -> tuple[ModelInfo, bool]:
        """Register ``model_id``; ``(info, created)``, the existing entry if known."""
        entry = self._entries.get(model_id)
        if entry is not None:
            return self._info(entry), False
        check_model_id(model_id)
        if len(self._entries) >= self._max:
            raise TooManyModels(f"the registry holds {self._max} models already")
        entry = self._entries[model_id] = _Entry(model_id, now)
        return self._info(entry), True

    def get(self, model_id: str) -> ModelInfo:
        return self._info(self._require(model_id))

    def all(self) -> list[ModelInfo]:
        """Every model, sorted by id (as tei-manager lists them)."""
        return [self._info(self._entries[key]) for key in sorted(self._entries)]

    def statuses(self) -> dict[str, ModelStatus]:
        return {key: entry.status for key, entry in self._entries.items()}

    def cached(self, model_id: str) -> CachedModel | None:
        return self._require(model_id).cached

    def observe_cache(self, found: Iterable[CachedModel], now: float) -> None:
        """What a scan of the cache found: known models get their files, new ones are registered.

        A model not found loses its files (deleted from the cache meanwhile)
        unless a download or smoke test of it runs.
        """
        seen: dict[str, CachedModel] = {}
        for cached in found:
            seen[cached.model_id] = cached
            if cached.model_id not in self._entries:
                try:
                    self.register(cached.model_id, now)
                except (InvalidModelId, TooManyModels):
                    continue
        for key, entry in self._entries.items():
            if not entry.busy:
                self._set_cached(entry, seen.get(key))

    def observe_one(self, model_id: str, cached: CachedModel | None) -> None:
        """A fresh look at one model's files."""
        entry = self._require(model_id)
        if not entry.busy:
            self._set_cached(entry, cached)

    def _set_cached(self, entry: _Entry, cached: CachedModel | None) -> None:
        entry.cached = cached
        # A failed smoke test stays failed; a failed download is forgotten once the files are here.
        failed_download = entry.status is ModelStatus.FAILED and entry.verification_error is None
        if cached is not None and (entry.status is ModelStatus.AVAILABLE or failed_download):
            entry.status = ModelStatus.DOWNLOADED
        elif cached is None and entry.status in (ModelStatus.DOWNLOADED, ModelStatus.VERIFIED):
            entry.status = ModelStatus.AVAILABLE

    # -- downloads -------------------------------------------------------------

    def begin_download(self, model_id: str) -> ModelInfo:
        entry = self._claim(model_id)
        entry.status = ModelStatus.DOWNLOADING
        entry.progress = Progress(0, None, 0, None, None)
        entry.download_error = None
        return self._info(entry)

    def download_progress(
        self,
        model_id: str,
        *,
        bytes_downloaded: int,
        bytes_total: int | None,
        files_downloaded: int,
        files_total: int | None,
    ) -> Progress:
        entry = self._require(model_id)
        if entry.status is not ModelStatus.DOWNLOADING:
            raise RuntimeError(f"model {model_id!r} is not downloading")
        entry.progress = Progress(
            bytes_downloaded,
            bytes_total,
            files_downloaded,
            files_total,
            _percent(bytes_downloaded, bytes_total),
        )
        return entry.progress

    def finish_download(self, model_id: str, cached: CachedModel) -> ModelInfo:
        entry = self._release(model_id, ModelStatus.DOWNLOADING)
        entry.cached = cached
        entry.status = ModelStatus.DOWNLOADED
        entry.verification_error = None
        if entry.progress is not None:
            total = entry.progress.bytes_total
            done = total if total is not None else entry.progress.bytes_downloaded
            files = entry.progress.files_total
            files_done = files if files is not None else entry.progress.files_downloaded
            entry.progress = Progress(done, total, files_done, files, 100.0)
        return self._info(entry)

    def fail_download(self, model_id: str, error: str) -> ModelInfo:
        entry = self._release(model_id, ModelStatus.DOWNLOADING)
        entry.download_error = error
        # Files of an earlier complete download are still there and usable.
        entry.status = ModelStatus.DOWNLOADED if entry.cached is not None else ModelStatus.FAILED
        return self._info(entry)

    # -- smoke tests -----------------------------------------------------------

    def begin_load(self, model_id: str) -> ModelInfo:
        entry = self._require(model_id)
        if entry.busy:
            raise ModelBusy(model_id, entry.status)
        if entry.cached is None:
            raise ModelNotDownloaded(model_id)
        entry.busy = True
        entry.status = ModelStatus.LOADING
        return self._info(entry)

    def finish_load(self, model_id: str, error: str | None, now: float) -> ModelInfo:
        entry = self._release(model_id, ModelStatus.LOADING)
        entry.last_verified = now
        entry.verification_error = error
        entry.status = ModelStatus.VERIFIED if error is None else ModelStatus.FAILED
        return self._info(entry)

    # -- helpers ---------------------------------------------------------------

    def _require(self, model_id: str) -> _Entry:
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id)
        return entry

    def _claim(self, model_id: str) -> _Entry:
        entry = self._require(model_id)
        if entry.busy:
            raise ModelBusy(model_id, entry.status)
        entry.busy = True
        return entry

    def _release(self, model_id: str, expected: ModelStatus) -> _Entry:
        entry = self._require(model_id)
        if not entry.busy or entry.status is not expected:
            raise RuntimeError(f"model {model_id!r} is {entry.status.value}, not {expected.value}")
        entry.busy = False
        return entry

    def _info(self, entry: _Entry) -> ModelInfo:
        cached = entry.cached
        return ModelInfo(
            model_id=entry.model_id,
            status=entry.status,
            downloaded=cached is not None,
            cache_path=cached.path if cached is not None else None,
            cache_size_bytes=cached.size_bytes if cached is not None else None,
            last_verified=(
                _rfc3339(entry.last_verified) if entry.last_verified is not None else None
            ),
            verification_error=entry.verification_error,
            metadata=cached.metadata if cached is not None else None,
            added_at=_rfc3339(entry.added_at),
            progress=entry.progress,
            download_error=entry.download_error,
        )
