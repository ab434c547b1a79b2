"""Per-instance log capture: pipe bytes to lines, a bounded memory tail, a rotated file.

`pump` reads one of a TEI child's pipes until EOF; a pure `LineSplitter` cuts
the bytes into lines; `InstanceLog` keeps the last lines in memory for the
logs endpoint and appends every line to ``{directory}/{name}.log``.

Decisions, and why:

- **Lines** are split on ``\\n``; a ``\\r`` before it is dropped. A line longer
  than ``max_line_bytes`` (64 KiB by default) keeps its first bytes and a
  ``[... N bytes truncated]`` marker; the rest is discarded as it arrives, so
  one endless line cannot grow memory.
- **Text** is decoded as UTF-8 with replacement characters and stripped of ANSI
  escapes (TEI colours its text logs unless ``NO_COLOR`` is set). A line that
  is a TEI ``--json-output`` object also carries its ``level``, ``message`` and
  ``target``. The file receives the same cleaned text, one line per line.
- **Time** on a `LogLine` is wall-clock epoch seconds, for display only;
  scheduling in teisup uses ``trio.current_time()``.
- **Rotation**: before a line would take ``name.log`` past ``max_bytes``, the
  file becomes ``name.log.1`` (older ones shift up to ``.{backups}``; the
  oldest is deleted). Disk use per instance is thus at most about
  ``(backups + 1) * max_bytes``. A file left by an earlier run is appended to.
- **Blocking I/O**: file writes are synchronous, in the pump's task, with one
  buffered flush per chunk read from the pipe (not per line). Appending a few
  KiB to the page cache takes microseconds, and a rotation is a handful of
  renames; a ``trio.to_thread`` hop per chunk would cost more than the write
  and would need extra care to keep stdout and stderr lines in order. The cost
  of this choice: a log directory on a filesystem that hangs (a dead NFS
  mount) would stall the event loop, so keep it on local disk.
- **Failures**: the pump must keep draining the pipe, or the child blocks on a
  full pipe. A file error (disk full, directory removed) is logged once, the
  line is kept in memory only, and the next write tries the file again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec
import trio

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "InstanceLog",
    "LineSplitter",
    "LogLine",
    "RotatingFile",
    "Stream",
    "is_ready_line",
    "parse_line",
    "pump",
]

logger = logging.getLogger("teisup.instances.logs")

#: Which pipe of the child a line came from.
Stream = Literal["stdout", "stderr"]

DEFAULT_MAX_LINE_BYTES = 64 * 1024

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# TEI's text format: timestamp, level, then "span: ", "target: " and "file:line: "
# prefixes (each one token ending in a colon), then the message.
_PLAIN_READY = re.compile(r"^\S+\s+INFO\s+(?:\S+:\s+)+Ready$")


class LogLine(msgspec.Struct, frozen=True):
    """One line of an instance's output.

    ``level``, ``message`` and ``target`` are set only for TEI JSON lines.
    """

    #: Wall-clock epoch seconds at which teisup read the line (display only).
    time: float
    stream: Stream
    #: The line without its terminator, ANSI escapes removed.
    text: str
    level: str | None = None
    message: str | None = None
    target: str | None = None


class _TeiJson(msgspec.Struct):
    level: str | None = None
    message: str | None = None
    target: str | None = None


_decode_tei_json = msgspec.json.Decoder(_TeiJson).decode


def parse_line(raw: bytes | str, stream: Stream, time: float) -> LogLine:
    """Build a `LogLine` from one line's bytes (or text), without its terminator."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    if text.startswith("{"):
        try:
            fields = _decode_tei_json(text)
        except msgspec.DecodeError:  # not JSON, or not the TEI shape: a plain line
            pass
        else:
            return LogLine(time, stream, text, fields.level, fields.message, fields.target)
    return LogLine(time, stream, text)


def is_ready_line(line: LogLine) -> bool:
    """Whether ``line`` is TEI's readiness message, ``Ready``, in JSON or text form."""
    if line.message is not None:
        return line.message == "Ready"
    return _PLAIN_READY.match(line.text.strip()) is not None


class LineSplitter:
    """Cuts a byte stream into lines; pure, bounded memory.

    Each returned line lacks its ``\\n`` (and a ``\\r`` before it). A line over
    ``max_line_bytes`` keeps that many bytes plus a truncation marker.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._dropped = 0
        self._ends_cr = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Add a chunk; return the lines it completed."""
        lines = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            self._take(data, start, end)
            if newline < 0:
                break
            lines.append(self._finish())
            start = newline + 1
        return lines

    def close(self) -> list[bytes]:
        """End of stream: the final unterminated line, if there is one."""
        if self._buf or self._dropped or self._ends_cr:
            return [self._finish()]
        return []

    def _take(self, data: bytes | bytearray, start: int, end: int) -> None:
        if end == start:
            return
        room = max(self.max_line_bytes - len(self._buf), 0)
        kept = min(end - start, room)
        self._buf += data[start : start + kept]
        self._dropped += end - start - kept
        # Remembered across chunks: "\r" and "\n" may arrive in different reads.
        self._ends_cr = data[end - 1] == 0x0D

    def _finish(self) -> bytes:
        if self._ends_cr:
            if self._dropped:
                self._dropped -= 1
            else:
                del self._buf[-1]
        line = bytes(self._buf)
        if self._dropped:
            line += b" [... %d bytes truncated]" % self._dropped
        self._buf.clear()
        self._dropped = 0
        self._ends_cr = False
        return line


class RotatingFile:
    """An append-only file that rotates to ``path.1`` .. ``path.{backups}`` by size.

    Synchronous (see the module notes). Opened on the first write. A line is
    never split across files, so a file exceeds ``max_bytes`` only when it
    holds a single line longer than that.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int, backups: int) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"need max_bytes >= 1 and backups >= 0, got {max_bytes}, {backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0

    def write_lines(self, lines: Iterable[bytes]) -> None:
        """Append each line plus ``\\n``, rotating between lines; flush once at the end.

        Raises ``OSError``; the file is then closed and reopened by the next call.
        """
        try:
            file = self._open()
            for line in lines:
                record = line + b"\n"
                if self._size and self._size + len(record) > self.max_bytes:
                    file = self._rotate()
                file.write(record)
                self._size += len(record)
            file.flush()
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (it is reopened by the next write)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # a failed final flush; the data is lost either way
                logger.debug("closing %s failed: %s", self.path, exc)

    def _open(self, *, truncate: bool = False) -> BinaryIO:
        file = self._file
        if file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "wb" if truncate else "ab")  # noqa: SIM115 - kept open
            self._size = os.fstat(file.fileno()).st_size
            self._file = file
        return file

    def _rotate(self) -> BinaryIO:
        assert self._file is not None
        self._file.flush()
        self.close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        return self._open(truncate=True)


class InstanceLog:
    """One instance's output: the last ``max_lines`` lines in memory, all in a file.

    With ``directory=None`` nothing is written to disk. ``clock`` supplies
    `LogLine.time` (wall-clock by default; a seam for tests).
    """

    def __init__(
        self,
        name: str,
        *,
        directory: str | os.PathLike[str] | None = None,
        max_lines: int = 1000,
        max_bytes: int = 10 * 2**20,
        backups: int = 3,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"instance name {name!r} cannot be used as a log file name")
        if max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, got {max_lines}")
        self.name = name
        self.max_line_bytes = max_line_bytes
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=max_lines)
        self._total = 0
        self._clock = clock
        self._file = (
            None
            if directory is None
            else RotatingFile(Path(directory) / f"{name}.log", max_bytes=max_bytes, backups=backups)
        )
        self._file_failing = False

    @property
    def path(self) -> Path | None:
        """The current log file, or ``None`` when logging to memory only."""
        return None if self._file is None else self._file.path

    @property
    def total(self) -> int:
        """Lines appended since creation, including those no longer in memory."""
        return self._total

    def __len__(self) -> int:
        return len(self._lines)

    def append(self, stream: Stream, raw: bytes | str) -> LogLine:
        """Record one line (without its terminator); see `extend`."""
        return self.extend(stream, [raw])[0]

    def extend(self, stream: Stream, raws: Iterable[bytes | str]) -> list[LogLine]:
        """Record lines read together from ``stream``: memory, then one file write."""
        now = self._clock()
        lines = [parse_line(raw, stream, now) for raw in raws]
        if not lines:
            return lines
        self._lines.extend(lines)
        self._total += len(lines)
        if self._file is not None:
            self._write([line.text.encode("utf-8", errors="replace") for line in lines])
        return lines

    def lines(self, start: int | None = None, end: int | None = None) -> list[LogLine]:
        """The retained lines ``[start:end]``, with Python slice semantics.

        As tei-manager's logs endpoint: a negative index counts from the end
        and is clamped at 0, a large one is clamped to the length, and
        ``start >= end`` gives ``[]``. Indices are over the lines in memory.
        """
        first, stop, _ = slice(start, end).indices(len(self._lines))
        return list(itertools.islice(self._lines, first, max(first, stop)))

    def tail(self, n: int) -> list[LogLine]:
        """The last ``n`` retained lines (``[]`` for ``n <= 0``)."""
        return self.lines(-n) if n > 0 else []

    def close(self) -> None:
        """Close the file; memory stays readable, and a later line reopens it."""
        if self._file is not None:
            self._file.close()

    def remove(self) -> list[Path]:
        """Close the file and delete it with its rotated copies; the paths removed.

        For a deleted instance: its name may be taken again by another one.
        A file that cannot be removed is logged and left.
        """
        if self._file is None:
            return []
        self._file.close()
        path, backups = self._file.path, self._file.backups
        removed = []
        for candidate in (
            path,
            *(path.with_name(f"{path.name}.{i}") for i in range(1, backups + 1)),
        ):
            try:
                candidate.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("instance %s: cannot remove %s: %s", self.name, candidate, exc)
            else:
                removed.append(candidate)
        return removed

    def __enter__(self) -> InstanceLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, records: list[bytes]) -> None:
        assert self._file is not None
        try:
            self._file.write_lines(records)
        except OSError as exc:
            if not self._file_failing:
                logger.warning(
                    "instance %s: cannot write log file %s, keeping lines in memory only: %s",
                    self.name,
                    self._file.path,
                    exc,
                )
            self._file_failing = True
        else:
            if self._file_failing:
                logger.info("instance %s: writing log file %s again", self.name, self._file.path)
            self._file_failing = False


async def pump(
    stream: trio.abc.ReceiveStream,
    log: InstanceLog,
    stream_name: Stream,
    *,
    on_line: Callable[[LogLine], None] | None = None,
    chunk_size: int = 65536,
) -> None:
    """Read ``stream`` until EOF, recording each line in ``log`` as ``stream_name``.

    ``on_line`` sees every line after it is recorded (e.g. to watch for
    `is_ready_line`). The stream is not closed; it belongs to the caller. On
    cancellation the partial last line is still recorded.
    """
    splitter = LineSplitter(log.max_line_bytes)
    try:
        while data := await stream.receive_some(chunk_size):
            _deliver(log.extend(stream_name, splitter.feed(data)), on_line)
    finally:
        _deliver(log.extend(stream_name, splitter.close()), on_line)


def _deliver(lines: list[LogLine], on_line: Callable[[LogLine], None] | None) -> None:
    if on_line is not None:
        for line in lines:
            on_line(line)
