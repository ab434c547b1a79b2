"""The ``teisup`` command as a user runs it: a real process and real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

import teisup


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "teisup", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"teisup {teisup.__version__}"


def test_unknown_command_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "teisup", "frobnicate"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_stops_cleanly_on_a_signal(signum: signal.Signals, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable, "-m", "teisup", "serve", "--api-port", str(port),
        "--state-file", str(tmp_path / "state.toml"), "--log-format", "json",
    ]  # fmt: skip
    env = {**os.environ, "TEISUP_DEFAULT_INSTANCE": "false", "TEISUP_BIND_HOST": "127.0.0.1"}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, env=env, stderr=subprocess.PIPE, check=False)
        )
        assert proc.stderr is not None
        log = b""
        with trio.fail_after(30):
            while b"stop with SIGTERM" not in log:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"teisup exited early: {log.decode()}"
                log += chunk
            proc.send_signal(signum)
            while chunk := await proc.stderr.receive_some():
                log += chunk
            assert await proc.wait() == 0
    lines = [json.loads(line) for line in log.decode().splitlines()]
    assert f"received {signum.name}; stopping" in [line["message"] for line in lines]
    assert {"timestamp", "level", "target", "message"} <= set(lines[0])
    assert (tmp_path / "state.toml").exists() or lines[-1]["message"] == "teisup stopped"


@pytest.mark.parametrize("how", ["environment", "config file"])
def test_a_configured_tei_binary_that_cannot_run_stops_teisup_before_anything_starts(
    how: str, tmp_path: Path
) -> None:
    binary = tmp_path / "text-embeddings-router"
    binary.write_text("#!/bin/sh\n")  # not executable
    state = tmp_path / "state.toml"
    argv = [sys.executable, "-m", "teisup", "serve", "--state-file", str(state)]
    env = {**os.environ, "TEISUP_BIND_HOST": "127.0.0.1", "TEI_BINARY_PATH": ""}
    if how == "environment":
        env["TEI_BINARY_PATH"] = str(binary)
    else:
        config = tmp_path / "teisup.toml"
        config.write_text(f"tei_binary_path = {json.dumps(str(binary))}\n")
        argv += ["-c", str(config)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        argv += ["--api-port", str(s.getsockname()[1])]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"teisup: TEI binary {binary}: not executable"]
    assert not state.exists()
    assert not (tmp_path / "logs").exists()
