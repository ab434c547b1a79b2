"""State snapshots: what instances exist and whether they should run.

The format is tei-manager's (``last_updated`` and ``[[instances]]`` with its
instance keys, TOML or JSON by the file's extension), so its state files load
here; teisup adds each instance's *desired* state and restart history.

Writes are atomic and durable: a temp file in the same directory, fsync,
``os.replace``, fsync of the directory; the previous generation is kept as
``<file>.bak``. A crash at any point leaves either the old or the new snapshot,
never a torn one. A failed write (disk full, read-only) leaves the previous
snapshot as it was.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from ..instances.spec import InstanceSpec
from ..supervision import ChildContext

__all__ = ["SavedInstance", "Snapshot", "StateStore", "StateWriter", "LoadResult"]

logger = logging.getLogger("teisup.state")


class SavedInstance(InstanceSpec, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An instance's spec with its assigned ports, plus what the manager must remember."""

    desired: Literal["running", "stopped"] = "running"
    created_at: str | None = None
    restarts: int = 0


class Snapshot(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The whole state file."""

    last_updated: str = ""
    instances: list[SavedInstance] = msgspec.field(default_factory=list)
    #: teisup's format version (absent in tei-manager's files).
    version: int = 1


class _RawSnapshot(msgspec.Struct, forbid_unknown_fields=True):
    """The state file with instances still undecoded, so one bad entry spoils only itself."""

    last_updated: str = ""
    instances: list[dict[str, Any]] = msgspec.field(default_factory=list)
    version: int = 1


class LoadResult(msgspec.Struct, frozen=True):
    """What `StateStore.load` found: the snapshot and where it came from."""

    snapshot: Snapshot
    #: "file", "backup", "missing" (no state yet) or "unreadable" (started empty).
    source: str
    problem: str | None = None
    #: Saved instances that no longer pass validation (say, after an upgrade
    #: tightened it): why each was left out. The file as it was is kept aside.
    rejected: list[str] = msgspec.field(default_factory=list)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class StateStore:
    """Reads and writes one state file (and its ``.bak``), atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self.json = self.path.suffix.lower() == ".json"

    def encode(self, snapshot: Snapshot) -> bytes:
        if self.json:
            return msgspec.json.format(msgspec.json.encode(snapshot), indent=2) + b"\n"
        return msgspec.toml.encode(snapshot)

    def decode(self, data: bytes) -> Snapshot:
        """The snapshot in ``data``; raises if it or any instance in it is invalid."""
        snapshot, rejected = self.decode_lenient(data)
        if rejected:
            raise ValueError("; ".join(rejected))
        return snapshot

    def decode_lenient(self, data: bytes) -> tuple[Snapshot, list[str]]:
        """The snapshot in ``data`` without the instances that fail validation, and why.

        Raises if the file itself cannot be parsed.
        """
        if self.json:
            raw = msgspec.json.decode(data, type=_RawSnapshot)
        else:
            raw = msgspec.toml.decode(data, type=_RawSnapshot)
        instances, rejected = [], []
        for index, item in enumerate(raw.instances):
            try:
                instances.append(msgspec.convert(item, SavedInstance))
            except msgspec.ValidationError as exc:
                name = item.get("name", "?")
                rejected.append(f"instances[{index}] ({name!r}): {exc}")
        return Snapshot(raw.last_updated, instances, raw.version), rejected

    def load(self) -> LoadResult:
        """The last good snapshot: the file, else its backup, else empty.

        A corrupt file is never overwritten blindly: with no readable backup
        either, it is moved aside (``<file>.corrupt-<time>``) and the manager
        starts empty.
        """
        problem = None
        for candidate, source in ((self.path, "file"), (self.backup, "backup")):
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problem = f"cannot read {candidate}: {exc.strerror}"
                logger.error("state: %s", problem)
                continue
            try:
                snapshot, rejected = self.decode_lenient(data)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                problem = f"{candidate} is corrupt: {exc}"
                logger.error("state: %s", problem)
                continue
            if source == "backup":
                logger.error("state: using the backup %s instead of %s", self.backup, self.path)
            if rejected:
                # The next write drops them from the file: keep it as it was.
                aside = self.path.with_name(f"{self.path.name}.rejected-{int(time.time())}")
                try:
                    aside.write_bytes(data)
                except OSError as exc:
                    logger.error("state: cannot keep a copy of %s: %s", candidate, exc)
                for reason in rejected:
                    logger.error("state: left out invalid saved instance %s", reason)
                problem = (
                    f"{len(rejected)} saved instance(s) no longer valid, left out "
                    f"(the file as it was: {aside}): " + "; ".join(rejected)
                )
            return LoadResult(snapshot, source, problem, rejected)
        if problem is None:
            return LoadResult(Snapshot(), "missing")
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
                logger.error("state: kept the unreadable state file as %s; starting empty", aside)
            except OSError as exc:
                logger.error("state: cannot move the unreadable state file aside: %s", exc)
        return LoadResult(Snapshot(), "unreadable", problem)

    def save(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` durably, keeping the current file as the backup.

        Blocking (fsync): call it from a worker thread. On error the current
        file is untouched and the temp file is removed.
        """
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        data = self.encode(snapshot)
        temp = directory / f".{self.path.name}.tmp-{os.getpid()}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                # A hard link keeps the current file in place while the backup
                # is replaced: there is always a complete state file.
                link = directory / f".{self.path.name}.bak-{os.getpid()}"
                link.unlink(missing_ok=True)
                os.link(self.path, link)
                os.replace(link, self.backup)
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StateWriter:
    """Writes a snapshot after changes; callers wait until theirs is on disk.

    `mark_dirty` asks for a write without waiting (transitions);
    `persist` asks and waits (lifecycle calls). Changes that arrive while a
    write is in progress share the next write. A failed write is logged,
    counted, and retried with backoff; `persist` then returns False rather
    than hanging the caller.
    """

    def __init__(
        self,
        store: StateStore,
        collect: Callable[[], list[SavedInstance]],
        *,
        on_write: Callable[[float, bool], None] | None = None,
    ) -> None:
        self.store = store
        self.collect = collect
        self.on_write = on_write
        self._requested = 0
        self._attempted = 0
        self._written = 0
        self._changed = trio.Event()
        self._progress = trio.Event()
        self.failures = 0
        self.last_error: str | None = None
        self._last_written: list[SavedInstance] | None = None

    def mark_dirty(self) -> int:
        """Request a write of the current state; return its generation."""
        self._requested += 1
        self._changed.set()
        return self._requested

    async def persist(self) -> bool:
        """Request a write and wait for it; True once it is durable."""
        generation = self.mark_dirty()
        while self._attempted < generation:
            await self._progress.wait()
        return self._written >= generation

    async def write_now(self) -> bool:
        """Write at once from the calling task (the final snapshot at shutdown)."""
        generation = self.mark_dirty()
        await self._write(generation)
        return self._written >= generation

    async def run(self, ctx: ChildContext) -> None:
        """The worker: write whenever asked, until asked to stop."""
        ctx.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._loop)
            await ctx.wait_stop_requested()
            nursery.cancel_scope.cancel()
        await self.write_now()

    async def _loop(self) -> None:
        delay = 0.5
        while True:
            if self._attempted >= self._requested:
                self._changed = trio.Event()
                await self._changed.wait()
            if await self._write(self._requested):
                delay = 0.5
            else:
                await trio.sleep(delay)  # retry: the disk may come back
                delay = min(delay * 2, 30.0)

    async def _write(self, generation: int) -> bool:
        instances = self.collect()
        if instances == self._last_written:
            # Most transitions (running <-> unhealthy, ...) change nothing a
            # snapshot holds: no I/O, and the file keeps its last_updated.
            self._settle(generation, written=True)
            return True
        snapshot = Snapshot(last_updated=_now(), instances=instances)
        began = time.perf_counter()
        ok = True
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.save, snapshot)
        except OSError as exc:
            ok = False
            self.failures += 1
            self.last_error = f"{exc.strerror or exc} ({self.store.path})"
            logger.error("state: cannot write %s: %s", self.store.path, exc)
        else:
            self._last_written = instances
            self.last_error = None
        if self.on_write is not None:
            self.on_write(time.perf_counter() - began, ok)
        self._settle(generation, written=ok)
        return ok

    def _settle(self, generation: int, *, written: bool) -> None:
        if written:
            self._written = max(self._written, generation)
        self._attempted = max(self._attempted, generation)
        progress, self._progress = self._progress, trio.Event()
        progress.set()
