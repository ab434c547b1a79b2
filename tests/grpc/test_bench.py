"""``teisup-bench`` against a real multiplexer."""

from __future__ import annotations

import socket
import sys

import pytest
import trio

from teisup.bench import run_bench

from .conftest import MINILM, Backend, Instances, running_mux


async def test_noop_arrow_needs_no_instance_and_reports_the_peers_fields() -> None:
    async with running_mux(Instances()) as m:
        report = await run_bench(
            "127.0.0.1", m.port, instance="any", mode="arrow", num_texts=250,
            batch_size=100, concurrency=2, noop=True,
        )  # fmt: skip
    assert {
        "mode", "instance_name", "num_texts", "batch_size", "num_requests",
        "total_duration_secs", "throughput_per_sec", "successful", "failed",
    } <= set(report)  # fmt: skip
    assert (report["num_requests"], report["successful"], report["failed"]) == (3, 250, 0)
    assert report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0


async def test_a_server_that_is_not_there_fails_fast_instead_of_hanging() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "teisup.bench", "-e", f"http://127.0.0.1:{port}",
             "-i", "x", "-n", "20", "--timeout", "2"],
            capture_stdout=True, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert b'"failed": 20' in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["standard", "stream", "arrow"])
async def test_every_mode_embeds_through_the_multiplexer(
    minilm_backend: Backend, mode: str
) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    async with running_mux(instances) as m:
        report = await run_bench(
            "127.0.0.1", m.port, instance="minilm", mode=mode, num_texts=40,
            batch_size=10, concurrency=4,
        )  # fmt: skip
    assert (report["successful"], report["failed"]) == (40, 0)


async def test_progress_reaches_the_total_and_the_bar_draws_it() -> None:
    import io

    from teisup.bench import ProgressBar

    seen: list[tuple[int, int]] = []
    async with running_mux(Instances()) as m:
        await run_bench(
            "127.0.0.1", m.port, instance="any", mode="arrow", num_texts=250,
            batch_size=100, concurrency=1, noop=True, progress=lambda d, t: seen.append((d, t)),
        )  # fmt: skip
    assert seen == [(100, 250), (200, 250), (250, 250)]
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    bar(250, 250)
    assert out.getvalue() == "\r[##########] 250/250 texts\n"


def test_the_bar_is_drawn_on_a_terminal_only() -> None:
    """On a pseudo-terminal stderr gets the bar; in a pipe (a log) it gets nothing."""
    import os
    import pty
    import subprocess

    argv = [sys.executable, "-m", "teisup.bench", "-e", "http://127.0.0.1:1", "-i", "x",
            "-n", "3", "--timeout", "2"]  # fmt: skip
    piped = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert piped.stderr == b""
    leader, follower = pty.openpty()
    try:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=follower, timeout=60, check=False)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert b"3/3 texts" in drawn
