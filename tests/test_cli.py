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

from .ports import free_port, private_port_block, with_private_ports

FAKE_TEI = Path(__file__).resolve().parent / "fake_tei.py"


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


async def test_json_log_lines_carry_the_instance_fields(tmp_path: Path) -> None:
    """--log-format json: an instance's lines say which instance, pid and model,
    and what happened; the tree's internal transitions stay below INFO."""
    router = tmp_path / "text-embeddings-router"
    router.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TEI}" "$@"\n')
    router.chmod(0o755)
    config = tmp_path / "teisup.toml"
    seed = '[[instances]]\nname = "mini"\nmodel_id = "BAAI/bge-small-en-v1.5"\n'
    config.write_text(with_private_ports(seed, private_port_block()))
    argv = [
        sys.executable, "-m", "teisup", "-c", str(config), "--log-format", "json",
        "--api-port", str(free_port()), "--grpc-port", str(free_port()),
        "--state-file", str(tmp_path / "state.toml"),
    ]  # fmt: skip
    env = {**os.environ, "TEI_BINARY_PATH": str(router), "TEISUP_BIND_HOST": "127.0.0.1"}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, env=env, stderr=subprocess.PIPE, check=False)
        )
        assert proc.stderr is not None
        log = b""
        with trio.fail_after(60):
            while b'"event": "ready"' not in log:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"teisup exited early: {log.decode()}"
                log += chunk
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stderr.receive_some():
                log += chunk
            assert await proc.wait() == 0
    lines = [json.loads(line) for line in log.decode().splitlines()]
    mine = [line for line in lines if line.get("instance") == "mini"]
    ready = next(line for line in mine if line.get("event") == "ready")
    assert ready["level"] == "INFO"
    assert ready["model_id"] == "BAAI/bge-small-en-v1.5"
    assert isinstance(ready["pid"], int)
    events = [line.get("event") for line in mine]
    assert events.index("spawned") < events.index("loading") < events.index("ready")
    states = [line["state"] for line in mine if line.get("event") == "transition"]
    assert states[:2] == ["starting", "running"]
    assert "stopped" in states
    # The api, the multiplexer and the other workers start and stop too, unlogged at INFO.
    internal = [
        line for line in lines if line.get("event") == "transition" and "instance" not in line
    ]
    assert internal == []
