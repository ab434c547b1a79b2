"""``teisup-bench`` against a real multiplexer, and against a real ``teisup``."""

from __future__ import annotations

import io
import json
import ssl
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from teisup.bench import ProgressBar, render_table, run_bench
from teisup.rpc import Status, StatusCode

from ..ports import free_port
from ..service.test_service_e2e import teisup
from .conftest import MINILM, Backend, Instances, running_mux

BENCH = [sys.executable, "-m", "teisup.bench"]
TOKEN = "bench-token-0123456789abcdef"


async def bench(*args: str, timeout: float = 60) -> tuple[int, str, str]:  # noqa: ASYNC109
    """Run the ``teisup-bench`` command; its exit status, stdout and stderr."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [*BENCH, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


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
    assert (report["successful_calls"], report["failed_calls"], report["errors"]) == (3, 0, [])
    latency = report["latency_ms"]
    assert latency["max"] >= latency["p99"] >= latency["p90"] >= latency["p50"] > 0
    assert report["throughput_per_sec"] > 0


async def test_a_closed_port_counts_every_call_that_failed_not_connections() -> None:
    """20 calls from 3 workers: 20 failed calls, one error row naming the cause."""
    code, out, err = await bench(
        "-e", f"http://127.0.0.1:{free_port()}", "-i", "x", "-n", "20", "-c", "3", "--timeout", "2"
    )  # fmt: skip
    assert code == 1, err
    report = json.loads(out)  # stdout is the JSON report and nothing else
    assert (report["failed"], report["failed_calls"], report["successful"]) == (20, 20, 0)
    assert report["concurrency"] == 3
    [row] = report["errors"]
    assert (row["code"], row["calls"], row["texts"]) == ("UNAVAILABLE", 20, 20)
    assert "Connection refused" in row["message"]
    assert set(report["latency_ms"].values()) == {None}


async def test_a_silent_server_fails_each_call_at_its_deadline() -> None:
    """A peer that accepts and never speaks: plaintext calls time out waiting for
    an answer, TLS ones while connecting (the handshake never ends)."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(30):
            plain = await run_bench(
                "127.0.0.1", port, instance="x", mode="standard", num_texts=4, batch_size=1,
                concurrency=2, timeout=0.5,
            )  # fmt: skip
            tls = await run_bench(
                "127.0.0.1", port, instance="x", mode="standard", num_texts=2, batch_size=1,
                concurrency=1, timeout=0.5, ssl_context=ssl.create_default_context(),
            )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert plain["errors"] == [
        {"code": "DEADLINE_EXCEEDED", "message": "no answer within 0.5 s", "calls": 4, "texts": 4}
    ]
    assert tls["errors"] == [
        {"code": "DEADLINE_EXCEEDED", "message": f"no connection to 127.0.0.1:{port} within 0.5 s",
         "calls": 2, "texts": 2}
    ]  # fmt: skip


async def test_errors_are_grouped_by_status_code_and_message_against_a_real_teisup(
    tmp_path: Path,
) -> None:
    """A wrong token, no token and an unknown instance are told apart; the table prints."""
    env = {"TEISUP_API_TOKEN": TOKEN, "TEISUP_DEFAULT_INSTANCE": "false"}
    async with teisup(tmp_path, env=env) as t:
        common: dict[str, Any] = {"mode": "standard", "num_texts": 6, "batch_size": 1}
        wrong = await run_bench(
            "127.0.0.1", t.grpc_port, instance="nope", concurrency=2, token="wrong", **common
        )
        missing = await run_bench(
            "127.0.0.1", t.grpc_port, instance="nope", concurrency=2, **common
        )
        unknown = await run_bench(
            "127.0.0.1", t.grpc_port, instance="nope", concurrency=2, token=TOKEN, **common
        )
        for report in (wrong, missing):
            assert report["errors"] == [
                {"code": "UNAUTHENTICATED", "message": "missing or wrong API token",
                 "calls": 6, "texts": 6}
            ]  # fmt: skip
        assert unknown["errors"] == [
            {"code": "NOT_FOUND", "message": "Instance 'nope' not found", "calls": 6, "texts": 6}
        ]
        # The right token gets through (noop: no instance needed).
        ok = await run_bench(
            "127.0.0.1", t.grpc_port, instance="nope", mode="arrow", num_texts=30,
            batch_size=10, concurrency=1, noop=True, token=TOKEN,
        )  # fmt: skip
        assert (ok["successful"], ok["failed"], ok["errors"]) == (30, 0, [])

        # The command, as a person runs it: bench-client's -b is the
        # concurrency in standard mode, and the table is for reading.
        code, out, err = await bench(
            "-e", f"http://127.0.0.1:{t.grpc_port}", "-i", "nope", "-n", "8", "-b", "4",
            "--token", TOKEN, "--format", "table",
        )  # fmt: skip
        assert code == 1, err
        lines = out.splitlines()
        assert lines[0].startswith("teisup-bench  standard mode  instance nope  at 127.0.0.1:")
        assert "  texts       8 in 8 calls (1 per call, 4 in flight)" in lines
        assert "  failed      8 texts, 8 calls" in lines
        heading = lines.index("failed calls by status")
        assert lines[heading + 1].split() == ["code", "calls", "message"]
        row = lines[heading + 2].split(maxsplit=2)
        assert row == ["NOT_FOUND", "8", "Instance 'nope' not found"]
        assert lines[lines.index("latency per successful call, ms") + 2].split() == ["-"] * 5
        assert await t.stop() == 0


async def test_a_refusal_by_the_gate_reads_permission_denied() -> None:
    def gate(call: object) -> Status:
        return Status(StatusCode.PERMISSION_DENIED, "client certificate x is not in the allow-list")

    async with running_mux(Instances(), authorize=gate) as m:
        report = await run_bench(
            "127.0.0.1", m.port, instance="any", mode="arrow", num_texts=20,
            batch_size=10, concurrency=1, noop=True,
        )  # fmt: skip
    assert report["errors"] == [
        {"code": "PERMISSION_DENIED", "message": "client certificate x is not in the allow-list",
         "calls": 2, "texts": 20}
    ]  # fmt: skip


def tls_server(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate from a fresh CA, and that CA's bundle."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    context.set_alpn_protocols(["h2"])
    bundle = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return context, bundle


async def test_https_verifies_the_server_unless_insecure_and_http_is_plaintext(
    tmp_path: Path,
) -> None:
    context, bundle = tls_server(tmp_path)
    async with running_mux(Instances(), ssl_context=context) as m:
        https = f"https://127.0.0.1:{m.port}"
        run = ("-i", "any", "-m", "arrow", "--noop", "-n", "20", "-b", "10", "--timeout", "10")
        code, out, _ = await bench("-e", https, *run)
        assert code == 1
        [row] = json.loads(out)["errors"]
        assert row["code"] == "UNAVAILABLE"
        assert "CERTIFICATE_VERIFY_FAILED" in row["message"]
        for trust in (["--ca", str(bundle)], ["--insecure"]):
            code, out, err = await bench("-e", https, *trust, *run)
            assert code == 0, out + err
            report = json.loads(out)
            assert (report["tls"], report["successful"], report["num_requests"]) == (True, 20, 2)
            # bench-client's arrow mode: one call at a time unless -c says more.
            assert report["concurrency"] == 1
        # The scheme decides: TLS flags on http:// are named as unused, and
        # the plaintext call to a TLS port fails.
        code, out, err = await bench("-e", f"http://127.0.0.1:{m.port}", "--insecure", *run)
        assert code == 1
        assert "--insecure ignored" in err
        assert json.loads(out)["tls"] is False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cert", "c.pem"], "--cert and --key go together"),
        (["-b", "0"], "--batch-size must be >= 1"),
        (["--max-message-size-mb", "2048"], "--max-message-size-mb must be 1..1023"),
        (["-e", "grpc://localhost:9001"], "--endpoint must be http://HOST:PORT or https://"),
        (["-e", "https://localhost:9001", "--ca", "/nonexistent/ca.pem"], "TLS files:"),
    ],
)
def test_bad_flags_are_refused_with_a_reason(flags: list[str], message: str) -> None:
    import subprocess

    out = subprocess.run([*BENCH, "-i", "x", *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    assert message in out.stderr


def test_the_table_shows_percentiles_beside_throughput() -> None:
    report = {
        "mode": "arrow", "instance_name": "bge-small", "num_texts": 1000, "batch_size": 100,
        "num_requests": 10, "total_duration_secs": 2.0, "throughput_per_sec": 500.0,
        "successful": 900, "failed": 100, "endpoint": "10.0.0.5:9001", "tls": True,
        "concurrency": 2, "texts_per_call": 100, "successful_calls": 9, "failed_calls": 1,
        "calls_per_sec": 5.0,
        "latency_ms": {"p50": 180.5, "p90": 210.25, "p95": 215.0, "p99": 230.125, "max": 1234.5},
        "errors": [{"code": "RESOURCE_EXHAUSTED", "message": "busy", "calls": 1, "texts": 100}],
    }  # fmt: skip
    assert render_table(report) == (
        "teisup-bench  arrow mode  instance bge-small  at 10.0.0.5:9001 (TLS)\n"
        "\n"
        "  texts       1000 in 10 calls (100 per call, 2 in flight)\n"
        "  duration    2.000 s\n"
        "  throughput  500.00 texts/s, 5.00 calls/s\n"
        "  successful  900 texts, 9 calls\n"
        "  failed      100 texts, 1 calls\n"
        "\n"
        "latency per successful call, ms\n"
        "      p50      p90      p95      p99       max\n"
        "  180.500  210.250  215.000  230.125  1234.500\n"
        "\n"
        "failed calls by status\n"
        "  code                calls  message\n"
        "  RESOURCE_EXHAUSTED      1  busy\n"
    )


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

    argv = [*BENCH, "-e", f"http://127.0.0.1:{free_port()}", "-i", "x", "-n", "3", "--timeout", "2"]
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
