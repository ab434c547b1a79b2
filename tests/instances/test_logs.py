"""Log capture: line splitting, TEI JSON and text lines, the memory tail, rotation, pumps."""

from __future__ import annotations

import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from teisup.instances.logs import (
    InstanceLog,
    LineSplitter,
    LogLine,
    RotatingFile,
    is_ready_line,
    parse_line,
    pump,
)

GRPC_READY_JSON = (
    b'{"timestamp":"2025-11-13T12:06:25.650647Z","level":"INFO","message":"Ready",'
    b'"target":"text_embeddings_router::grpc::server","filename":"router/src/grpc/server.rs",'
    b'"line_number":1511}'
)
HTTP_READY_JSON = (
    b'{"timestamp":"2025-11-13T12:06:25Z","level":"INFO","message":"Ready",'
    b'"target":"text_embeddings_router::http::server","filename":"router/src/http/server.rs",'
    b'"line_number":1853}'
)
PLAIN_READY = (
    b"2025-11-13T12:06:25Z  INFO text_embeddings_router::grpc::server: "
    b"router/src/grpc/server.rs:1511: Ready"
)
# What TEI prints without NO_COLOR: dim timestamp, green level, bold target.
COLOURED_READY = (
    b"\x1b[2m2025-11-13T12:06:25Z\x1b[0m \x1b[32m INFO\x1b[0m "
    b"\x1b[1mtext_embeddings_router::grpc::server\x1b[0m\x1b[2m:\x1b[0m "
    b"\x1b[2mrouter/src/grpc/server.rs\x1b[0m\x1b[2m:\x1b[0m\x1b[2m1511:\x1b[0m Ready"
)


def split(*chunks: bytes, limit: int = 1024) -> list[bytes]:
    splitter = LineSplitter(limit)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.close()


# LineSplitter


def test_splits_complete_lines_and_keeps_the_partial_one() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntwo\nthr") == [b"one", b"two"]
    assert splitter.feed(b"ee") == []
    assert splitter.feed(b"\n") == [b"three"]
    assert splitter.close() == []


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ((b"a\r\nb\r\n",), [b"a", b"b"]),
        ((b"a\r", b"\nb"), [b"a", b"b"]),  # CRLF split across reads
        ((b"a\rb\n",), [b"a\rb"]),  # a lone CR is content
        ((b"\n\n",), [b"", b""]),
        ((b"tail",), [b"tail"]),  # final line without a newline
        ((b"tail\r",), [b"tail"]),
        ((b"",), []),
        ((b"x\n", b""), [b"x"]),
    ],
)
def test_split_edge_cases(chunks: tuple[bytes, ...], expected: list[bytes]) -> None:
    assert split(*chunks) == expected


def test_byte_at_a_time_equals_all_at_once() -> None:
    data = b"alpha\r\nbeta\n\ngamma\rdelta\r\nend"
    assert split(*(data[i : i + 1] for i in range(len(data)))) == split(data)


def test_overlong_line_is_capped_with_a_marker() -> None:
    assert split(b"x" * 10 + b"\nok\n", limit=4) == [b"xxxx [... 6 bytes truncated]", b"ok"]
    assert split(b"abcdef\r\n", limit=4) == [b"abcd [... 2 bytes truncated]"]
    assert split(b"abcdefgh", limit=4) == [b"abcd [... 4 bytes truncated]"]
    assert split(b"abcd\r\n", limit=4) == [b"abcd"]  # exactly the limit: nothing dropped


def test_overlong_line_never_buffers_more_than_the_limit() -> None:
    splitter = LineSplitter(16)
    for _ in range(1000):
        assert splitter.feed(b"y" * 4096) == []
        assert len(splitter._buf) <= 16
    assert splitter.feed(b"\n") == [b"y" * 16 + b" [... %d bytes truncated]" % (4096 * 1000 - 16)]


def test_splitter_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineSplitter(0)


# parse_line and is_ready_line


def test_tei_json_line_is_parsed() -> None:
    line = parse_line(GRPC_READY_JSON, "stdout", 12.5)
    assert line == LogLine(
        time=12.5,
        stream="stdout",
        text=GRPC_READY_JSON.decode(),
        level="INFO",
        message="Ready",
        target="text_embeddings_router::grpc::server",
    )


def test_json_with_spans_and_extra_fields_is_parsed() -> None:
    raw = (
        '{"timestamp":"t","level":"INFO","message":"Success","total_time":"1ms",'
        '"target":"text_embeddings_router::grpc::server","span":{"name":"embed"},'
        '"spans":[{"name":"embed"}]}'
    )
    line = parse_line(raw, "stdout", 0.0)
    assert (line.level, line.message, line.target) == (
        "INFO",
        "Success",
        "text_embeddings_router::grpc::server",
    )


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"level": 3, "message": "x"}',  # not the TEI shape
        "[1, 2]",
        "Error: Could not download model artifacts",
    ],
)
def test_other_lines_are_plain(raw: str) -> None:
    line = parse_line(raw, "stderr", 0.0)
    assert line == LogLine(0.0, "stderr", raw)


def test_ansi_codes_are_stripped() -> None:
    line = parse_line(COLOURED_READY, "stdout", 0.0)
    assert line.text == PLAIN_READY.decode()
    assert "\x1b" not in line.text
    assert line.level is None


def test_invalid_utf8_is_replaced() -> None:
    assert parse_line(b"caf\xc3", "stdout", 0.0).text == "caf\ufffd"


def test_log_line_encodes_as_json() -> None:
    line = parse_line(HTTP_READY_JSON, "stdout", 1.0)
    assert msgspec.json.decode(msgspec.json.encode(line), type=LogLine) == line


@pytest.mark.parametrize("raw", [GRPC_READY_JSON, HTTP_READY_JSON, PLAIN_READY, COLOURED_READY])
def test_ready_is_recognised(raw: bytes) -> None:
    assert is_ready_line(parse_line(raw, "stdout", 0.0))


@pytest.mark.parametrize(
    "raw",
    [
        b"2025-11-13T12:06:25Z  INFO text_embeddings_router::grpc::server: "
        b"router/src/grpc/server.rs:1510: Starting gRPC server: 0.0.0.0:80",
        b"2025-11-13T12:06:25Z  WARN text_embeddings_router: router/src/lib.rs:1: Ready",
        b"2025-11-13T12:06:25Z  INFO text_embeddings_router: router/src/lib.rs:1: NotReady",
        b'{"timestamp":"t","level":"INFO","message":"Ready soon","target":"x"}',
        b"Ready",
        b"",
    ],
)
def test_other_lines_are_not_ready(raw: bytes) -> None:
    assert not is_ready_line(parse_line(raw, "stdout", 0.0))


# InstanceLog in memory


def five_lines() -> InstanceLog:
    log = InstanceLog("m", clock=lambda: 100.0)
    log.extend("stdout", [f"line {i}".encode() for i in range(5)])
    return log


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (None, None, [0, 1, 2, 3, 4]),
        (0, 2, [0, 1]),  # tei-manager's test: ?start=0&end=2
        (-2, None, [3, 4]),  # ?start=-2 -> 3..5
        (-100, 2, [0, 1]),  # negative clamped to 0
        (3, 100, [3, 4]),  # large clamped to the length
        (4, 2, []),
        (2, 2, []),
        (0, -1, [0, 1, 2, 3]),
        (-1, -3, []),
        (100, None, []),
    ],
)
def test_lines_use_python_slice_semantics(
    start: int | None, end: int | None, expected: list[int]
) -> None:
    assert texts(five_lines().lines(start, end)) == [f"line {i}" for i in expected]


def test_tail() -> None:
    log = five_lines()
    assert texts(log.tail(2)) == ["line 3", "line 4"]
    assert texts(log.tail(50)) == texts(log.lines())
    assert log.tail(0) == []
    assert log.tail(-1) == []


def test_memory_keeps_only_the_last_lines() -> None:
    log = InstanceLog("m", max_lines=3)
    for i in range(10):
        log.append("stdout", f"{i}")
    assert texts(log.lines()) == ["7", "8", "9"]
    assert len(log) == 3
    assert log.total == 10
    assert log.path is None


def test_lines_carry_stream_and_clock_time() -> None:
    times = iter([1.0, 2.0])
    log = InstanceLog("m", clock=lambda: next(times))
    log.append("stdout", b"out")
    log.append("stderr", b"err")
    assert [(line.stream, line.time) for line in log.lines()] == [("stdout", 1.0), ("stderr", 2.0)]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc", "a\0b"])
def test_names_unfit_for_a_file_are_rejected(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log file name"):
        InstanceLog(name, directory=tmp_path)


# The file and its rotation


def test_lines_are_appended_to_the_file(tmp_path: Path) -> None:
    with InstanceLog("bge", directory=tmp_path / "logs") as log:
        log.append("stdout", COLOURED_READY)
        log.append("stderr", b"Error: boom")
    assert log.path == tmp_path / "logs" / "bge.log"
    assert log.path.read_bytes() == PLAIN_READY + b"\nError: boom\n"


def test_an_existing_file_is_continued(tmp_path: Path) -> None:
    (tmp_path / "bge.log").write_bytes(b"earlier run\n")
    with InstanceLog("bge", directory=tmp_path) as log:
        log.append("stdout", b"now")
    assert (tmp_path / "bge.log").read_bytes() == b"earlier run\nnow\n"


def test_rotation_keeps_the_newest_lines_within_the_size_cap(tmp_path: Path) -> None:
    with InstanceLog("m", directory=tmp_path, max_bytes=20, backups=2) as log:
        for i in range(30):
            log.append("stdout", f"line {i:02d}")  # 8 bytes + newline
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.log", "m.log.1", "m.log.2"]
    assert all(p.stat().st_size <= 20 for p in tmp_path.iterdir())
    newest_first = [(tmp_path / name).read_text() for name in ("m.log", "m.log.1", "m.log.2")]
    assert newest_first == [
        "line 28\nline 29\n",
        "line 26\nline 27\n",
        "line 24\nline 25\n",
    ]
    assert log.total == 30  # memory is unaffected by rotation


def test_remove_deletes_the_file_and_its_rotated_copies_only(tmp_path: Path) -> None:
    (tmp_path / "other.log").write_text("another instance's\n")
    log = InstanceLog("m", directory=tmp_path, max_bytes=20, backups=2)
    for i in range(30):
        log.append("stdout", f"line {i:02d}")
    removed = log.remove()
    assert sorted(p.name for p in removed) == ["m.log", "m.log.1", "m.log.2"]
    assert [p.name for p in tmp_path.iterdir()] == ["other.log"]
    assert InstanceLog("memory-only").remove() == []


def test_rotation_within_one_batch(tmp_path: Path) -> None:
    file = RotatingFile(tmp_path / "m.log", max_bytes=10, backups=1)
    file.write_lines([b"aaaa", b"bbbb", b"cccc"])
    file.close()
    assert (tmp_path / "m.log.1").read_bytes() == b"aaaa\nbbbb\n"
    assert (tmp_path / "m.log").read_bytes() == b"cccc\n"


def test_zero_backups_truncates_in_place(tmp_path: Path) -> None:
    file = RotatingFile(tmp_path / "m.log", max_bytes=10, backups=0)
    file.write_lines([b"aaaa", b"bbbb", b"cccc"])
    file.close()
    assert [p.name for p in tmp_path.iterdir()] == ["m.log"]
    assert (tmp_path / "m.log").read_bytes() == b"cccc\n"


def test_a_line_over_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    file = RotatingFile(tmp_path / "m.log", max_bytes=4, backups=3)
    file.write_lines([b"a", b"long line", b"b"])
    file.close()
    assert (tmp_path / "m.log.2").read_bytes() == b"a\n"
    assert (tmp_path / "m.log.1").read_bytes() == b"long line\n"
    assert (tmp_path / "m.log").read_bytes() == b"b\n"


def test_rotating_file_rejects_bad_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        RotatingFile(tmp_path / "m.log", max_bytes=0, backups=1)


def test_file_errors_keep_lines_in_memory_and_recover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the directory should be")
    log = InstanceLog("m", directory=blocker)
    with caplog.at_level(logging.INFO, logger="teisup.instances.logs"):
        log.append("stdout", b"one")
        log.append("stdout", b"two")
        blocker.unlink()
        log.append("stdout", b"three")
    log.close()
    assert texts(log.lines()) == ["one", "two", "three"]
    assert (blocker / "m.log").read_bytes() == b"three\n"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write log file" in m for m in messages) == 1  # once per failure streak
    assert sum("writing log file" in m and "again" in m for m in messages) == 1


# pump


async def test_pump_reads_a_memory_stream_until_eof() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    log = InstanceLog("m")
    seen: list[LogLine] = []
    await send.send_all(b"first\r\nsec")
    await send.send_all(b"ond\n" + GRPC_READY_JSON + b"\nno newline")
    await send.aclose()
    await pump(receive, log, "stderr", on_line=seen.append)
    assert texts(log.lines()) == ["first", "second", GRPC_READY_JSON.decode(), "no newline"]
    assert {line.stream for line in log.lines()} == {"stderr"}
    assert seen == log.lines()
    assert [is_ready_line(line) for line in seen] == [False, False, True, False]


async def test_pump_records_the_partial_line_when_cancelled() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    log = InstanceLog("m")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, receive, log, "stdout")
        await send.send_all(b"done\npartial")
        await trio.testing.wait_all_tasks_blocked()
        assert texts(log.lines()) == ["done"]
        nursery.cancel_scope.cancel()
    assert texts(log.lines()) == ["done", "partial"]


async def test_pump_reads_a_real_child_process(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "for i in range(3): print(f'out {i}', flush=True)\n"
        "sys.stderr.write('Error: boom\\r\\n')\n"
        "print(" + repr(PLAIN_READY.decode()) + ", end='')\n"
    )
    log = InstanceLog("child", directory=tmp_path)
    ready = trio.Event()

    def watch(line: LogLine) -> None:
        if is_ready_line(line):
            ready.set()

    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        nursery.start_soon(partial(pump, process.stdout, log, "stdout", on_line=watch))
        nursery.start_soon(pump, process.stderr, log, "stderr")
        await ready.wait()
    log.close()
    assert process.returncode == 0
    by_stream = {s: [ln.text for ln in log.lines() if ln.stream == s] for s in ("stdout", "stderr")}
    assert by_stream == {
        "stdout": ["out 0", "out 1", "out 2", PLAIN_READY.decode()],
        "stderr": ["Error: boom"],
    }
    assert sorted((tmp_path / "child.log").read_text().splitlines()) == sorted(
        by_stream["stdout"] + by_stream["stderr"]
    )
