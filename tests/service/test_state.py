"""State snapshots: atomic writes, the backup, corruption, failures, coalescing."""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from teisup.service.state import SavedInstance, Snapshot, StateStore
from teisup.service.writer import RetrySchedule, StateWriter

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


def _two_generations(store: StateStore) -> tuple[Snapshot, Snapshot]:
    first = Snapshot(last_updated="t1", instances=[saved("a", 8080)])
    second = Snapshot(last_updated="t2", instances=[saved("a", 8080), saved("b", 8082)])
    store.save(first)
    store.save(second)
    return first, second


@pytest.mark.parametrize("bad", [b"", b"\n  \n", b'last_updated = "t3"\n[[instances]\nname ='])
def test_an_empty_or_garbage_file_is_kept_aside_and_never_replaces_the_backup(
    tmp_path: Path, bad: bytes
) -> None:
    store = StateStore(tmp_path / "state.toml")
    first, _ = _two_generations(store)
    store.path.write_bytes(bad)
    result = store.load()
    assert (result.source, result.snapshot) == ("backup", first)
    assert result.problem is not None
    assert "corrupt" in result.problem
    [aside] = tmp_path.glob("state.toml.corrupt-*")
    assert aside.read_bytes() == bad
    assert result.kept_aside == [str(aside)]
    # The next write keeps the good backup: the bad file never becomes it.
    third = Snapshot(last_updated="t3", instances=[saved("a", 8080), saved("c", 8084)])
    store.save(third)
    assert store.decode(store.backup.read_bytes()) == first
    assert StateStore(store.path).load().snapshot == third


def test_a_file_torn_behind_teisups_back_is_not_rotated_into_the_backup(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml")
    first, _ = _two_generations(store)
    store.path.write_bytes(store.path.read_bytes()[:25])
    torn = store.path.read_bytes()
    store.save(Snapshot(last_updated="t3", instances=[saved("c", 8084)]))
    # The backup is still a good generation, and the torn file is kept.
    assert store.decode(store.backup.read_bytes()) == first
    [aside] = tmp_path.glob("state.toml.corrupt-*")
    assert aside.read_bytes() == torn


def test_a_corrupt_backup_is_kept_aside_too(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.toml")
    store.path.write_bytes(b"")
    store.backup.write_bytes(b"{{{")
    result = store.load()
    assert (result.source, result.snapshot) == ("unreadable", Snapshot())
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [
        "state.toml.bak.corrupt",
        "state.toml.corrupt",
    ]
    assert [p.read_bytes() for p in sorted(tmp_path.glob("*.bak.corrupt-*"))] == [b"{{{"]


DUPLICATES = {
    "name": (
        '[[instances]]\nname = "a"\nmodel_id = "m"\nport = 8080\n'
        '[[instances]]\nname = "b"\nmodel_id = "m"\nport = 8081\n'
        '[[instances]]\nname = "a"\nmodel_id = "other"\nport = 8082\n',
        "instances[2] ('a'): the name is already instances[0]'s",
    ),
    "port": (
        '[[instances]]\nname = "a"\nmodel_id = "m"\nport = 8080\n'
        '[[instances]]\nname = "b"\nmodel_id = "m"\nport = 8080\n',
        "instances[1] ('b'): its port 8080 is already instances[0] ('a')'s port",
    ),
    "prometheus_port": (
        '[[instances]]\nname = "a"\nmodel_id = "m"\nport = 8080\nprometheus_port = 9100\n'
        '[[instances]]\nname = "b"\nmodel_id = "m"\nport = 9100\n',
        "instances[1] ('b'): its port 9100 is already instances[0] ('a')'s prometheus_port",
    ),
}


@pytest.mark.parametrize("clash", sorted(DUPLICATES))
def test_duplicate_saved_instances_keep_the_first_a_rejected_copy_and_a_log_line(
    tmp_path: Path, clash: str, caplog: pytest.LogCaptureFixture
) -> None:
    original, reason = DUPLICATES[clash]
    store = StateStore(tmp_path / "state.toml")
    store.path.write_text(f'last_updated = "t"\n{original}')
    with caplog.at_level(logging.ERROR, logger="teisup.state"):
        result = store.load()
    assert result.source == "file"
    names = [i.name for i in result.snapshot.instances]
    assert len(names) == len(set(names))
    assert names[0] == "a"
    assert result.rejected == [reason]
    [aside] = tmp_path.glob("state.toml.rejected-*")
    assert aside.read_text() == f'last_updated = "t"\n{original}'
    assert any(reason in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="already"):
        store.decode(store.path.read_bytes())


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
        nursery.start_soon(writer.loop)
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
        nursery.start_soon(writer.loop)
        assert not await writer.persist()
        assert writer.failures >= 1
        assert writer.last_error is not None
        # The directory appears: the retry loop gets it written.
        blocker.unlink()
        blocker.mkdir()
        assert await writer.persist()
        assert store.path.exists()
        nursery.cancel_scope.cancel()


def test_the_retry_schedule_doubles_to_its_cap_and_resets() -> None:
    schedule = RetrySchedule(initial=0.25, factor=2.0, maximum=5.0)
    now, delays = 100.0, []
    for _ in range(8):
        at = schedule.failed(now)
        delays.append(at - now)
        now = at
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert (schedule.streak, schedule.retry_at) == (8, now)
    schedule.succeeded()
    assert (schedule.streak, schedule.retry_at) == (0, None)
    assert schedule.failed(0.0) == 0.25
    for _ in range(5000):  # a week-long outage: still the cap, never an overflow
        schedule.failed(0.0)
    assert schedule.delay() == 5.0
    with pytest.raises(ValueError, match="initial"):
        RetrySchedule(initial=0)
    with pytest.raises(ValueError, match="initial"):
        RetrySchedule(initial=10, maximum=5)


async def _inline(fn: Callable[..., object], *args: object) -> object:
    """Run the store's blocking save in the task itself: no thread, so time stays virtual."""
    return fn(*args)


async def test_a_failed_write_is_retried_on_its_own_timer_until_it_lands(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = StateStore(blocker / "state.toml")
    instances = [saved("a", 8080)]
    attempts: list[tuple[float, bool]] = []
    writer = StateWriter(
        store,
        lambda: list(instances),
        on_write=lambda _, ok: attempts.append((trio.current_time(), ok)),
        durable_wait=1.0,
        offload=_inline,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.loop)
        began = trio.current_time()
        # The disk refuses at once: the caller hears so at once, not after the backoff.
        assert not await writer.persist()
        assert trio.current_time() - began < 1.0
        status = writer.status()
        assert not status.durable
        assert status.last_error is not None
        assert str(store.path) in status.last_error
        assert status.pending_since is not None
        await trio.sleep(10.0)
        assert writer.status().pending_seconds == 10.0
        # Retried without any further request, the waits doubling to the cap.
        times = [t - began for t, _ in attempts]
        assert [b - a for a, b in itertools.pairwise(times)] == [
            0.25, 0.5, 1.0, 2.0, 4.0
        ]  # fmt: skip
        assert not any(ok for _, ok in attempts)
        # The directory appears; nobody asks again: the next retry writes it.
        blocker.unlink()
        blocker.mkdir()
        with trio.fail_after(5.0):
            await writer.wait_durable()
        assert attempts[-1][1]
        assert writer.status() == writer.status().__class__(durable=True, path=str(store.path))
        assert [i.name for i in store.load().snapshot.instances] == ["a"]
        nursery.cancel_scope.cancel()


async def test_transitions_during_an_outage_wait_for_the_retry_timer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    instances = [saved("a", 8080)]
    attempts: list[float] = []
    writer = StateWriter(
        StateStore(blocker / "state.toml"),
        lambda: list(instances),
        on_write=lambda _, ok: attempts.append(trio.current_time()),
        retry=RetrySchedule(initial=4.0, maximum=4.0),
        offload=_inline,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.loop)
        assert not await writer.persist()
        for restarts in range(1, 50):  # a crash-looping instance changes the snapshot
            instances[0] = SavedInstance(name="a", model_id="m", port=8080, restarts=restarts)
            writer.mark_dirty()
            await trio.sleep(0.01)
        assert len(attempts) == 1  # no write per transition: the timer decides
        await trio.sleep(4.0)
        assert len(attempts) == 2
        nursery.cancel_scope.cancel()


async def test_a_hung_write_answers_the_caller_after_the_bounded_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = StateStore(tmp_path / "state.toml")
    release = trio.Event()

    async def hung_disk(fn: Callable[..., object], *args: object) -> object:
        await release.wait()  # an NFS server gone away
        return fn(*args)

    writer = StateWriter(store, lambda: [saved("a", 8080)], durable_wait=1.5, offload=hung_disk)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.loop)
        began = trio.current_time()
        assert not await writer.persist()
        assert trio.current_time() - began == 1.5
        assert not writer.status().durable
        assert writer.status().last_error is None  # not failed: still under way
        release.set()
        with trio.fail_after(1.0):
            await writer.wait_durable()
        assert store.path.exists()
        nursery.cancel_scope.cancel()
