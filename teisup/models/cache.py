"""The HuggingFace hub cache on disk: which models are complete in it, and how a
download lands in it whole or not at all.

huggingface_hub writes each file under ``blobs/`` as ``<etag>.incomplete``
and renames it when done, but links ``snapshots/<commit>/config.json`` as
soon as that file is in: a download cut off halfway leaves a snapshot that
has a ``config.json`` (what offline resolution looks for) and no weights.
So the registry downloads into a staging cache next to the real one and
moves the finished repository in (`commit_staged`): the snapshot directory
by one rename, the ref that points at it last. Discovery (`scan`) also
counts a snapshot complete only when it has a config and whole weights.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import msgspec

from ..embedded import hub_cache_dir, repo_folder
from .registry import CachedModel, ModelMetadata

__all__ = [
    "STAGING_DIR",
    "cached_model",
    "clean_staging",
    "commit_staged",
    "hub_cache_dir",
    "new_staging",
    "repo_folder",
    "scan",
]

logger = logging.getLogger("teisup.models")

#: Where downloads are staged, inside the cache (so a rename moves them in).
STAGING_DIR = ".teisup-staging"

#: Files any one of which makes a snapshot's weights (TEI's order).
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.onnx", "model.safetensors.index.json")

_METADATA_KEYS = (
    "model_type",
    "hidden_size",
    "max_position_embeddings",
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _metadata(snapshot: Path) -> ModelMetadata:
    try:
        config = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError):
        return ModelMetadata()
    if not isinstance(config, dict):
        return ModelMetadata()
    values: dict[str, object] = {}
    for key in _METADATA_KEYS:
        value = config.get(key)
        wanted = str if key == "model_type" else int
        if isinstance(value, wanted) and not isinstance(value, bool):
            values[key] = value
    return msgspec.convert(values, ModelMetadata)


def _complete(snapshot: Path) -> bool:
    """Whether ``snapshot`` has a config and whole weights (every shard of an index).

    huggingface_hub links a file into a snapshot only once its blob is
    whole, so a weights file that is there is complete.
    """
    if not (snapshot / "config.json").is_file():
        return False
    for name in WEIGHTS[:-1]:
        if (snapshot / name).is_file():
            return True
    index = snapshot / WEIGHTS[-1]
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((snapshot / str(shard)).is_file() for shard in shards)


def _size(snapshot: Path) -> int:
    total = 0
    for path in snapshot.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size  # follows the link to the blob
        except OSError:
            continue
    return total


def _pick_snapshot(repo: Path, revision: str = "main") -> Path | None:
    """The snapshot ``refs/<revision>`` names if complete, else the newest complete one."""
    ref = repo / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        commit = None
    snapshots = repo / "snapshots"
    if commit:
        named = snapshots / commit
        if _complete(named):
            return named
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    complete = [p for p in candidates if _complete(p)]
    if not complete:
        return None
    return max(complete, key=lambda p: p.stat().st_mtime)


def cached_model(cache: Path, model_id: str) -> CachedModel | None:
    """``model_id``'s complete snapshot in ``cache``, or None."""
    repo = cache / repo_folder(model_id)
    snapshot = _pick_snapshot(repo)
    if snapshot is None:
        return None
    return CachedModel(model_id, str(snapshot), _size(snapshot), _metadata(snapshot))


def scan(cache: Path) -> list[CachedModel]:
    """Every model with a complete snapshot in ``cache`` (huggingface_hub's `scan_cache_dir`)."""
    if not cache.is_dir():
        return []
    # huggingface_hub brings its HTTP stack along: imported when first used,
    # not with the manager (a tenth of its import time).
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except (OSError, ValueError) as exc:
        logger.warning("cannot scan the HuggingFace cache %s: %s", cache, exc)
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        model = cached_model(cache, repo.repo_id)
        if model is not None:
            found.append(model)
    return sorted(found, key=lambda m: m.model_id)


def new_staging(cache: Path) -> Path:
    """A fresh staging cache for one download (named after this process)."""
    path = cache / STAGING_DIR / f"{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(cache: Path) -> list[Path]:
    """Remove what downloads of dead processes (this one's earlier life too) left staged."""
    root = cache / STAGING_DIR
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name.split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _alive(int(pid_text)):
            continue  # another manager sharing this cache, still downloading
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _move_tree(source: Path, target: Path) -> None:
    """Move every file under ``source`` to the same place under ``target``, replacing."""
    for path in sorted(source.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)


def commit_staged(staging: Path, cache: Path, model_id: str) -> CachedModel:
    """Move the finished download in ``staging`` into ``cache``; the model as it now is there.

    Order: blobs, the tree listing, then each snapshot directory by one
    rename, and the refs last, so that at every moment what the refs name
    is complete. Raises `OSError` if it cannot (the cache is left as it was,
    or with extra blobs no snapshot uses).
    """
    name = repo_folder(model_id)
    staged = staging / name
    target = cache / name
    if not target.exists():
        # The common case: the model is new to the cache, and one rename brings it in.
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
    else:
        for part in ("blobs", "trees"):
            if (staged / part).is_dir():
                _move_tree(staged / part, target / part)
        snapshots = staged / "snapshots"
        for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            destination = target / "snapshots" / snapshot.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.exists():
                # A partial snapshot of the same commit (another tool's cut-off download).
                aside = staging / f"replaced-{snapshot.name}"
                os.rename(destination, aside)
            os.rename(snapshot, destination)
        if (staged / "refs").is_dir():
            _move_tree(staged / "refs", target / "refs")
    model = cached_model(cache, model_id)
    if model is None:
        raise OSError(f"the download of {model_id} is not complete in {target}")
    return model
