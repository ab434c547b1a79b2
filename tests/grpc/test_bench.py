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
