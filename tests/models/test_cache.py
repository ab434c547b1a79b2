"""The hub cache on disk: what counts as complete, and how a staged download moves in."""

from __future__ import annotations

import json
import os
from pathlib import Path

from teisup.models import hub_cache_dir
from teisup.models.cache import cached_model, commit_staged, repo_folder

MODEL = "org/model"


def put_snapshot(cache: Path, commit: str, files: dict[str, bytes], ref: str | None) -> Path:
    """A repository as huggingface_hub lays it out: blobs, snapshot links, a ref."""
    repo = cache / repo_folder(MODEL)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / f"{commit}-{name}"
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(ref)
    return snapshot


def test_a_snapshot_with_a_config_but_no_weights_is_not_complete(tmp_path: Path) -> None:
    # What a download cut off after config.json leaves in a plain hub cache.
    put_snapshot(tmp_path, "a" * 40, {"config.json": b"{}"}, ref="a" * 40)
    (tmp_path / repo_folder(MODEL) / "blobs" / "x.incomplete").write_bytes(b"half")
    assert cached_model(tmp_path, MODEL) is None


def test_sharded_weights_are_complete_only_with_every_shard(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    files = {
        "config.json": b'{"model_type": "bert", "hidden_size": 8, "vocab_size": true}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-1.safetensors": b"1",
    }
    snapshot = put_snapshot(tmp_path, "b" * 40, files, ref="b" * 40)
    assert cached_model(tmp_path, MODEL) is None
    (snapshot / "model-2.safetensors").write_bytes(b"2")
    found = cached_model(tmp_path, MODEL)
    assert found is not None
    # Metadata: what config.json says, of the right types only.
    assert (found.metadata.model_type, found.metadata.hidden_size) == ("bert", 8)
    assert found.metadata.vocab_size is None


def test_a_staged_download_merges_into_a_repository_already_cached(tmp_path: Path) -> None:
    cache, staging = tmp_path / "cache", tmp_path / "cache" / ".teisup-staging" / "1-x"
    old, new = "o" * 40, "n" * 40
    put_snapshot(cache, old, {"config.json": b"{}", "model.safetensors": b"old"}, ref=old)
    # A partial snapshot of the new commit already there (another tool's cut-off download).
    put_snapshot(cache, new, {"config.json": b"{}"}, ref=None)
    put_snapshot(staging, new, {"config.json": b"{}", "model.safetensors": b"new"}, ref=new)

    model = commit_staged(staging, cache, MODEL)

    assert model.path == str(cache / repo_folder(MODEL) / "snapshots" / new)
    assert (Path(model.path) / "model.safetensors").read_bytes() == b"new"
    assert (cache / repo_folder(MODEL) / "refs" / "main").read_text() == new
    # The older snapshot is untouched.
    old_weights = cache / repo_folder(MODEL) / "snapshots" / old / "model.safetensors"
    assert old_weights.read_bytes() == b"old"


def test_the_cache_directory_follows_huggingface_hub_variables() -> None:
    assert hub_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub_cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub_cache_dir({}) == Path("~/.cache/huggingface/hub").expanduser()
