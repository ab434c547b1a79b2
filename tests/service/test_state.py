"""State snapshots: atomic writes, the backup, corruption, failures, coalescing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgspec
import pytest
import trio

from teisup.service.state import SavedInstance, Snapshot, StateStore, StateWriter

TEI_MANAGER_STATE = """\
last_updated = "2025-11-19T14:38:49.303726Z"

[[instances]]
name = "bge-small"
model_id = "BAAI/bge-small-en-v1.5"
port = 8080
max_batch_tokens = 16384
max_concurrent_requests = 512
pooling = "splade"
gpu_id = 0
prometheus_port = 9100
startup_timeout_secs = 600
extra_args = []
created_at = "2025-11-19T14:30:00Z"
"""


def saved(name: str, port: int, desired: str = "running") -> SavedInstance:
    return SavedInstance(
        name=name,
        model_id="m",
        port=port,
        prometheus_port=port + 1000,
        desired=desired,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_snapshot_round_trips_and_keeps_the_previous_generation(
    tmp_path: Path, suffix: str
) -> None:
    store = StateStore(tmp_path / f"state{suffix}")
    first = Snapshot(last_updated="t1", instances=[saved("a", 8080)])
    second = Snapshot(last_updated="t2", instances=[saved("a", 8080, "stopped"), saved("b", 8081)])
    store.save(first)
    store.save(second)
    assert store.load().snapshot == second
    assert store.decode(store.backup.read_bytes()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"state{suffix}", f"state{suffix}.bak"]


def test_tei_managers_state_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "tei-manager-state.toml"
    path.write_text(TEI_MANAGER_STATE)
    [instance] = StateStore(path).load().snapshot.instances
    assert (instance.name, instance.port, instance.pooling) == ("bge-small", 8080, "splade")
    assert instance.desired == "running"  # tei-manager restored everything


def test_a_corrupt_file_falls_back_to_the_backup(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml")
    store.save(Snapshot(instances=[saved("a", 8080)]))
    store.save(Snapshot(instances=[saved("a", 8080), saved("b", 8081)]))
    store.path.write_bytes(store.path.read_bytes()[:25])  # torn by something else
    result = store.load()
    assert result.source == "backup"
    assert [i.name for i in result.snapshot.instances] == ["a"]
    assert result.problem is not None
    assert "corrupt" in result.problem


def test_with_nothing_readable_it_starts_empty_and_keeps_the_bad_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml")
    store.path.write_text("instances = [[[")
    result = store.load()
    assert (result.source, result.snapshot) == ("unreadable", Snapshot())
    [aside] = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside.read_text() == "instances = [[["
    assert StateStore(tmp_path / "none.toml").load().source == "missing"


def test_an_instance_that_no_longer_validates_spoils_only_itself(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml")
    original = TEI_MANAGER_STATE + (
        '\n[[instances]]\nname = "smuggler"\nmodel_id = "--model-id=x; rm -rf /"\nport = 8081\n'
    )
    store.path.write_text(original)
    result = store.load()
    assert result.source == "file"
    assert [i.name for i in result.snapshot.instances] == ["bge-small"]
    [reason] = result.rejected
    assert reason.startswith("instances[1] ('smuggler'): ")
    assert "model_id" in reason
    assert result.problem is not None
    # Nothing is lost: the file as it was is kept aside for the operator.
    [aside] = tmp_path.glob("state.toml.rejected-*")
    assert aside.read_text() == original


def test_a_failed_write_leaves_the_previous_snapshot_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path / "state.toml")
    store.save(Snapshot(instances=[saved("a", 8080)]))
    before = store.path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save(Snapshot(instances=[saved("a", 8080), saved("b", 8081)]))
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.toml"]  # no temp left


async def test_the_writer_coalesces_bursts_and_reports_durability(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    instances = [saved("a", 8080)]
    writes: list[bool] = []
    writer = StateWriter(store, lambda: list(instances), on_write=lambda _, ok: writes.append(ok))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer._loop)
        for port in range(8081, 8091):
            instances.append(saved(f"i{port}", port))
            writer.mark_dirty()
        assert await writer.persist()
        on_disk = msgspec.json.decode(store.path.read_bytes(), type=Snapshot)
        assert len(on_disk.instances) == 11
        assert len(writes) < 11  # the burst shared writes
        nursery.cancel_scope.cancel()


async def test_a_failing_disk_is_retried_and_persist_does_not_hang(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = StateStore(blocker / "state.toml")
    writer = StateWriter(store, list)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer._loop)
        assert not await writer.persist()
        assert writer.failures >= 1
        assert writer.last_error is not None
        # The directory appears: the retry loop gets it written.
        blocker.unlink()
        blocker.mkdir()
        assert await writer.persist()
        assert store.path.exists()
        nursery.cancel_scope.cancel()
