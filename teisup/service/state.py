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
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..instances import InstanceSpec

__all__ = ["CorruptState", "LoadResult", "SavedInstance", "Snapshot", "StateStore"]

logger = logging.getLogger("teisup.state")


class SavedInstance(InstanceSpec, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An instance's spec with its assigned ports, plus what the manager must remember."""

    desired: Literal["running", "stopped"] = "running"
    created_at: str | None = None
    restarts: int = 0
    #: Whether the user set ``port`` (kept even when taken) or the manager
    #: chose it (replaced when taken). tei-manager's files say neither: their
    #: ports count as chosen by the manager.
    port_pinned: bool = False
    prometheus_port_pinned: bool = False


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
    #: Saved instances that were left out (no longer valid, say after an
    #: upgrade tightened validation, or a duplicate name or port): why each was.
    #: The file as it was is kept aside.
    rejected: list[str] = msgspec.field(default_factory=list)
    #: Copies of every bad file read, kept for the operator (``.corrupt-*``,
    #: ``.rejected-*``).
    kept_aside: list[str] = msgspec.field(default_factory=list)


class CorruptState(ValueError):
    """A state file that cannot be parsed at all (empty, torn, not TOML/JSON)."""


def _duplicates(entries: list[tuple[int, SavedInstance]]) -> dict[int, str]:
    """Which entries repeat an earlier one's name or port, and why; the first one is kept.

    ``entries`` are (index in the file, instance); so are the indices in the reasons.
    """
    names: dict[str, int] = {}
    ports: dict[int, tuple[int, str, str]] = {}
    out: dict[int, str] = {}
    for index, item in entries:
        mine = [
            (p, k) for p, k in ((item.port, "port"), (item.prometheus_port, "prometheus_port")) if p
        ]
        if item.name in names:
            out[index] = f"the name is already instances[{names[item.name]}]'s"
            continue
        clash = next(((p, k) for p, k in mine if p in ports), None)
        if clash is not None:
            port, key = clash
            first, name, their_key = ports[port]
            out[index] = f"its {key} {port} is already instances[{first}] ({name!r})'s {their_key}"
            continue
        names[item.name] = index
        for port, key in mine:
            ports[port] = (index, item.name, key)
    return out


class StateStore:
    """Reads and writes one state file (and its ``.bak``), atomically.

    A bad file is never lost and never overwrites a good one: what cannot be
    parsed (an empty file included) is moved aside as ``<file>.corrupt-<time>``
    and the backup is used; a file with entries left out is copied to
    ``<file>.rejected-<time>``; and `save` never rotates a main file that does
    not parse into the backup.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self.json = self.path.suffix.lower() == ".json"
        #: The bytes of the main file as last read good or written: no need to
        #: parse it again before rotating it into the backup.
        self._known_good: bytes | None = None

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
        """The snapshot in ``data`` without the instances left out, and why each was.

        An instance is left out when it fails validation or repeats an earlier
        one's name or port (the first is kept). Raises `CorruptState` if the
        file itself cannot be parsed; an empty file is corrupt (teisup never
        writes one, tei-manager neither).
        """
        if not data.strip():
            raise CorruptState("the file is empty")
        try:
            if self.json:
                raw = msgspec.json.decode(data, type=_RawSnapshot)
            else:
                raw = msgspec.toml.decode(data, type=_RawSnapshot)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptState(str(exc)) from None
        valid: list[tuple[int, SavedInstance]] = []
        rejected: dict[int, str] = {}
        for index, item in enumerate(raw.instances):
            try:
                valid.append((index, msgspec.convert(item, SavedInstance)))
            except msgspec.ValidationError as exc:
                rejected[index] = f"{exc}"
        rejected.update(_duplicates(valid))
        kept = [item for index, item in valid if index not in rejected]
        reasons = [
            f"instances[{index}] ({raw.instances[index].get('name', '?')!r}): {why}"
            for index, why in sorted(rejected.items())
        ]
        return Snapshot(raw.last_updated, kept, raw.version), reasons

    def _aside(self, source: Path, kind: str, copy: bytes | None = None) -> Path | None:
        """Move ``source`` to ``<source>.<kind>-<time>`` (or write ``copy`` there).

        The path it is kept at, or None (logged) if that failed.
        """
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = source.with_name(f"{source.name}.{kind}-{stamp}")
        try:
            if copy is None:
                os.replace(source, aside)
            else:
                with open(aside, "xb") as f:
                    f.write(copy)
        except OSError as exc:
            logger.error("state: cannot keep %s aside as %s: %s", source, aside, exc)
            return None
        return aside

    def load(self) -> LoadResult:
        """The last good snapshot: the file, else its backup, else empty.

        Every bad file read is kept for the operator: one that cannot be parsed
        is moved aside (``<file>.corrupt-<time>``), so the next write cannot
        rotate it over a good backup; one with instances left out is copied
        (``<file>.rejected-<time>``) before the next write drops them.
        """
        problems: list[str] = []
        kept: list[str] = []
        for candidate, source in ((self.path, "file"), (self.backup, "backup")):
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(f"cannot read {candidate}: {exc.strerror}")
                logger.error("state: %s", problems[-1])
                continue
            try:
                snapshot, rejected = self.decode_lenient(data)
            except CorruptState as exc:
                aside = self._aside(candidate, "corrupt")
                where = f" (kept as {aside})" if aside else ""
                problems.append(f"{candidate} is corrupt: {exc}{where}")
                logger.error("state: %s", problems[-1])
                if aside is not None:
                    kept.append(str(aside))
                continue
            if source == "backup":
                logger.error("state: using the backup %s instead of %s", self.backup, self.path)
            else:
                self._known_good = None if rejected else data
            if rejected:
                aside = self._aside(candidate, "rejected", data)
                if aside is not None:
                    kept.append(str(aside))
                for reason in rejected:
                    logger.error("state: left out saved instance %s", reason)
                problems.append(
                    f"{len(rejected)} saved instance(s) left out "
                    f"(the file as it was: {aside or 'not kept'}): " + "; ".join(rejected)
                )
            problem = "; ".join(problems) or None
            return LoadResult(snapshot, source, problem, rejected, kept)
        if not problems:
            return LoadResult(Snapshot(), "missing")
        logger.error("state: no readable state file; starting empty")
        return LoadResult(Snapshot(), "unreadable", "; ".join(problems), kept_aside=kept)

    def _rotatable(self) -> bool:
        """Whether the current main file may become the backup: it exists and parses.

        One that does not (torn or emptied behind teisup's back) is moved aside
        instead, so it never replaces a good backup.
        """
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.error("state: cannot read %s, keeping the backup as it is: %s", self.path, exc)
            return False
        if current == self._known_good:
            return True
        try:
            self.decode_lenient(current)
        except CorruptState as exc:
            aside = self._aside(self.path, "corrupt")
            logger.error(
                "state: %s is corrupt (%s); kept as %s, the backup stays", self.path, exc, aside
            )
            return False
        return True

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
            if self._rotatable():
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
        self._known_good = data
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
