"""The ``teisup`` command as a user runs it: a real process and real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial

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
async def test_serve_stops_cleanly_on_a_signal(signum: signal.Signals) -> None:
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "teisup", "serve"],
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        assert proc.stderr is not None
        log = b""
        with trio.fail_after(30):
            while b"running" not in log:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"teisup exited early: {log.decode()}"
                log += chunk
            proc.send_signal(signum)
            while chunk := await proc.stderr.receive_some():
                log += chunk
            assert await proc.wait() == 0
    assert f"received {signum.name}; stopping" in log.decode()
