"""The model registry (tei-manager 0.12's ``/models``): which models the manager
knows, their files in the HuggingFace hub cache, downloads from the Hub with
progress, and smoke tests that start an instance of a model and embed once.

`ModelRegistry` (`registry.py`) is the pure state machine; `cache.py` reads
the hub cache and moves finished downloads into it; `HubDownloader`
(`download.py`) runs huggingface_hub's `snapshot_download`;
`InstanceSmokeTest` (`smoke.py`) starts the instance; `ModelService`
(`service.py`) is the supervised worker that carries it all out.
"""

from .cache import hub_cache_dir
from .download import Downloader, DownloadError, HubDownloader, ProgressReport
from .registry import (
    MODEL_ID_PATTERN,
    CachedModel,
    InvalidModelId,
    ModelBusy,
    ModelInfo,
    ModelMetadata,
    ModelNotDownloaded,
    ModelNotFound,
    ModelRegistry,
    ModelStatus,
    Progress,
    TooManyModels,
    check_model_id,
)
from .service import DownloadFailed, ModelService, RegistryStopped
from .smoke import InstanceSmokeTest, Loader, smoke_instance_name

__all__ = [
    "MODEL_ID_PATTERN",
    "CachedModel",
    "DownloadError",
    "DownloadFailed",
    "Downloader",
    "HubDownloader",
    "InstanceSmokeTest",
    "InvalidModelId",
    "Loader",
    "ModelBusy",
    "ModelInfo",
    "ModelMetadata",
    "ModelNotDownloaded",
    "ModelNotFound",
    "ModelRegistry",
    "ModelService",
    "ModelStatus",
    "Progress",
    "ProgressReport",
    "RegistryStopped",
    "TooManyModels",
    "check_model_id",
    "hub_cache_dir",
    "smoke_instance_name",
]
