"""teisup.rpc on real sockets, and the fake TEI as the real subprocess it stands in for."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import purerpc
import pytest
import trio
import trio.testing

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import (
    HealthServicer,
    Method,
    RpcStatusError,
    RpcUnavailable,
    Server,
    ServerCall,
    Service,
    ServingStatus,
    StatusCode,
    call_with_deadline,
    check_health,
    fetch_info,
    open_channel,
)

FAKE_TEI = Path(__file__).resolve().parent.parent / "fake_tei.py"
LOCAL = "127.0.0.1"

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port nobody listens on (bound for an instant, then released)."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(*services: Any) -> AsyncIterator[tuple[Server, int]]:
    """A teisup.rpc Server on a free loopback port, cancelled on exit."""
    server = Server(0)
    for service in services:
        server.add_service(service)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_async)
        yield server, port
        nursery.cancel_scope.cancel()


class Fake:
    """A running tests/fake_tei.py: its process and its log lines so far."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.port = 0
        self._buffer = b""

    async def next_line(self) -> dict[str, Any] | None:
        """The next JSON log line, or None at end of output."""
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        record: dict[str, Any] = json.loads(line)
        self.lines.append(record)
        return record

    async def wait_ready(self) -> int:
        """Read log lines up to ``Ready``; return the port it serves on."""
        with trio.fail_after(10):
            while (record := await self.next_line()) is not None:
                prefix = "Starting gRPC server: "
                if record["message"].startswith(prefix):
                    self.port = int(record["message"].rsplit(":", 1)[1])
                if record["message"] == "Ready":
                    return self.port
        raise AssertionError(f"fake TEI exited before Ready: {await self.stderr()}")

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        data = b""
        while chunk := await self.proc.stderr.receive_some():
            data += chunk
        return data.decode()

    async def wait(self) -> int:
        with trio.fail_after(10):
            return await self.proc.wait()


@asynccontextmanager
async def fake_tei(*flags: str, **knobs: str) -> AsyncIterator[Fake]:
    """Start the fake TEI (port 0, JSON logs); ``knobs`` become FAKE_TEI_* variables."""
    argv = [
        sys.executable,
        str(FAKE_TEI),
        "--model-id",
        "BAAI/bge-small-en-v1.5",
        "--port",
        "0",
        "--hostname",
        LOCAL,
        "--prometheus-port",
        "0",
        "--json-output",
        *flags,
    ]
    env = {**os.environ, **{f"FAKE_TEI_{k.upper()}": v for k, v in knobs.items()}}
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        yield Fake(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                assert pipe is not None
                await pipe.aclose()


# --------------------------------------------------------------------------- server


async def test_server_binds_loopback_only_and_a_taken_port_fails() -> None:
    async with serving(HealthServicer()) as (server, port):
        assert server.host == LOCAL
        assert server.port == port != 0
        with pytest.raises(OSError, match="in use") as info:
            await Server(port).serve_async()
        assert info.value.errno == errno.EADDRINUSE
        # Not even a socket that asks for SO_REUSEPORT may share the port:
        # the listener did not set it (purerpc's own Server does).
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="in use") as info:
                s.bind((LOCAL, port))
            assert info.value.errno == errno.EADDRINUSE


async def test_cancelling_the_server_closes_listener_and_connections() -> None:
    async with serving(HealthServicer()) as (server, port):
        client = await trio.open_tcp_stream(LOCAL, port)
        await trio.testing.wait_all_tasks_blocked()
        assert server.open_connections == 1
    assert server.open_connections == 0
    with trio.fail_after(5):
        while await client.receive_some():  # the server's HTTP/2 preface, then EOF
            pass
    await client.aclose()
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(LOCAL, port)


async def test_tls_is_passed_through() -> None:
    trustme = pytest.importorskip("trustme", reason="trustme makes the test certificates")
    grpc = pytest.importorskip("grpc", reason="grpcio checks that ALPN h2 survives")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOCAL, "localhost").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])  # the caller's job; grpcio insists on it
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2"])

    def grpcio_check(port: int) -> int:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(f"{LOCAL}:{port}", credentials) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            return int(check(health_pb2.HealthCheckRequest(), timeout=5).status)

    server = Server(0, ssl_context=server_ctx)
    server.add_service(HealthServicer({"": ServingStatus.SERVING}))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_async)
        status = await check_health(LOCAL, port, timeout=5, ssl_context=client_ctx)
        assert status is ServingStatus.SERVING
        assert await trio.to_thread.run_sync(grpcio_check, port) == ServingStatus.SERVING
        with pytest.raises(RpcUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await check_health(LOCAL, port, timeout=5, ssl_context=ssl.create_default_context())
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- health


def test_serving_status_is_the_protocols() -> None:
    proto = health_pb2.HealthCheckResponse.ServingStatus
    assert [(s.name, s.value) for s in ServingStatus] == proto.items()


async def test_check_health_reports_each_services_status() -> None:
    health = HealthServicer({"": ServingStatus.SERVING, "tei.v1.Embed": ServingStatus.NOT_SERVING})
    async with serving(health) as (_, port):
        assert await check_health(LOCAL, port, timeout=5) is ServingStatus.SERVING
        embed = await check_health(LOCAL, port, service="tei.v1.Embed", timeout=5)
        assert embed is ServingStatus.NOT_SERVING
        # grpc.health.v1 Check answers NOT_FOUND for an unknown service.
        unknown = await check_health(LOCAL, port, service="tei.v1.Nope", timeout=5)
        assert unknown is ServingStatus.SERVICE_UNKNOWN

        health.set_status("tei.v1.Embed", ServingStatus.SERVING)
        embed = await check_health(LOCAL, port, service="tei.v1.Embed", timeout=5)
        assert embed is ServingStatus.SERVING
        health.clear_status("tei.v1.Embed")
        embed = await check_health(LOCAL, port, service="tei.v1.Embed", timeout=5)
        assert embed is ServingStatus.SERVICE_UNKNOWN
        assert dict(health.statuses) == {"": ServingStatus.SERVING}


async def test_health_watch_sends_every_change() -> None:
    health = HealthServicer({"svc": ServingStatus.SERVING})
    request = health_pb2.HealthCheckRequest(service="svc")
    async with serving(health) as (_, port), open_channel(LOCAL, port) as channel:
        # purerpc's raw stream API: the stub's async-iterator API leaves an inner
        # async generator unclosed when the caller stops early (a ResourceWarning).
        client = purerpc.Client("grpc.health.v1.Health", channel)
        with trio.fail_after(5):
            stream = await client.rpc(
                "Watch", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            )
            await stream.send_message(request)
            await stream.close()
            seen = [(await stream.receive_message()).status]
            health.set_status("svc", ServingStatus.NOT_SERVING)
            seen.append((await stream.receive_message()).status)
            health.clear_status("svc")
            seen.append((await stream.receive_message()).status)
    assert seen == [ServingStatus.SERVING, ServingStatus.NOT_SERVING, ServingStatus.SERVICE_UNKNOWN]


# --------------------------------------------------------------------------- failures


async def test_nobody_listening_fails_fast() -> None:
    port = free_port()
    with trio.fail_after(2):  # far inside the call's own deadline
        with pytest.raises(RpcUnavailable, match="Connection refused"):
            await check_health(LOCAL, port, timeout=30)
        with pytest.raises(RpcUnavailable, match="cannot connect"):
            await fetch_info(LOCAL, port, timeout=30)


async def test_a_peer_that_never_answers_fails_at_the_deadline() -> None:
    held: list[trio.SocketStream] = []

    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, accept_and_say_nothing, 0, host=LOCAL)
        )
        port = listeners[0].socket.getsockname()[1]
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(RpcUnavailable, match=r"no answer within 0\.3 s"):
            await check_health(LOCAL, port, timeout=0.3)
        assert trio.current_time() - start >= 0.3
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()


class SlowInfo(tei_grpc.InfoServicer):
    """An Info that never answers, and tells whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = trio.Event()

    async def Info(self, input_message: tei_pb2.InfoRequest) -> tei_pb2.InfoResponse:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()


class BrokenInfo(tei_grpc.InfoServicer):
    async def Info(self, input_message: tei_pb2.InfoRequest) -> tei_pb2.InfoResponse:
        raise RuntimeError("model on fire")


class KeyedInfo(tei_grpc.InfoServicer):
    """Info that, like TEI with --api-key, wants ``authorization: Bearer <key>``."""

    async def Info(self, input_message: tei_pb2.InfoRequest, request: Any = None) -> Any:
        if ("authorization", "Bearer sesame") not in request.custom_metadata:
            from purerpc import UnauthenticatedError

            raise UnauthenticatedError("No valid auth token")
        return tei_pb2.InfoResponse(model_id="keyed")


async def test_error_statuses_become_rpc_status_error() -> None:
    async with serving(BrokenInfo()) as (_, port):
        with pytest.raises(RpcStatusError) as info:
            await fetch_info(LOCAL, port, timeout=5)
        assert (info.value.code, info.value.code_name) == (2, "UNKNOWN")
        assert "model on fire" in info.value.details
        # No health service on this server at all.
        with pytest.raises(RpcStatusError) as info:
            await check_health(LOCAL, port, timeout=5)
        assert info.value.code_name == "UNIMPLEMENTED"


async def test_fetch_info_sends_the_api_key() -> None:
    async with serving(KeyedInfo()) as (_, port):
        assert (await fetch_info(LOCAL, port, timeout=5, api_key="sesame")).model_id == "keyed"
        with pytest.raises(RpcStatusError, match="No valid auth token") as info:
            await fetch_info(LOCAL, port, timeout=5, api_key="wrong")
        assert info.value.code_name == "UNAUTHENTICATED"


async def test_a_call_on_an_open_channel_ends_at_its_deadline() -> None:
    slow = SlowInfo()
    async with serving(slow) as (_, port), open_channel(LOCAL, port) as channel:
        stub = tei_grpc.InfoStub(channel)
        with pytest.raises(RpcUnavailable, match=r"no answer within 0\.2 s"):
            await call_with_deadline(
                lambda: stub.Info(tei_pb2.InfoRequest()), timeout=0.2, target=channel.target
            )
    # Our client cannot send grpc-timeout, so the handler ran until the
    # connection closed; then the server cancelled it.
    assert slow.cancelled.is_set()


# --------------------------------------------------------------------------- the fake TEI


async def test_fake_tei_serves_info_and_health_and_exits_0_on_sigterm() -> None:
    flags = ("--max-batch-tokens", "2048", "--revision", "abc123", "--auto-truncate")
    async with fake_tei(*flags) as fake:
        port = await fake.wait_ready()
        info = await fetch_info(LOCAL, port, timeout=5)
        assert info.version == "1.9.3"
        assert info.model_id == "BAAI/bge-small-en-v1.5"
        assert info.model_sha == "abc123"
        assert info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING
        assert (info.max_input_length, info.max_batch_tokens) == (512, 2048)
        assert not info.HasField("max_batch_requests")
        for service in ("", "tei.v1.Info", "tei.v1.Embed"):
            status = await check_health(LOCAL, port, service=service, timeout=5)
            assert status is ServingStatus.SERVING, service
        rerank = await check_health(LOCAL, port, service="tei.v1.Rerank", timeout=5)
        assert rerank is ServingStatus.NOT_SERVING

        fake.proc.send_signal(signal.SIGTERM)
        assert await fake.wait() == 0
        while await fake.next_line() is not None:
            pass
    ready = next(r for r in fake.lines if r["message"] == "Ready")
    assert ready["level"] == "INFO"
    assert ready["target"] == "text_embeddings_router::grpc::server"
    assert set(ready) == {"timestamp", "level", "message", "target", "filename", "line_number"}
    assert fake.lines[-1]["message"] == "signal received, starting graceful shutdown"


async def test_fake_tei_unknown_flag_is_a_usage_error() -> None:
    done = await trio.run_process(
        [sys.executable, str(FAKE_TEI), "--model-id", "x", "--frobnicate"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2
    assert b"usage: text-embeddings-router" in done.stderr
    assert b"--frobnicate" in done.stderr
    assert done.stdout == b""


async def test_fake_tei_taken_port_is_an_error() -> None:
    with socket.create_server((LOCAL, 0)) as taken:
        port = taken.getsockname()[1]
        done = await trio.run_process(
            [sys.executable, str(FAKE_TEI), "--port", str(port), "--json-output"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(b"Error: Could not bind TCP Listener")
    assert b'"message":"Ready"' not in done.stdout


async def test_a_stopped_server_fails_at_the_deadline_then_recovers() -> None:
    async with fake_tei() as fake:
        port = await fake.wait_ready()
        fake.proc.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(5), pytest.raises(RpcUnavailable, match="no answer within"):
                await check_health(LOCAL, port, timeout=0.3)
        finally:
            fake.proc.send_signal(signal.SIGCONT)
        assert await check_health(LOCAL, port, timeout=5) is ServingStatus.SERVING
        fake.proc.send_signal(signal.SIGTERM)
        assert await fake.wait() == 0


async def test_a_server_that_dies_mid_call_fails_the_call_at_once() -> None:
    async with fake_tei(hang="0") as fake:  # answers nothing once Ready
        port = await fake.wait_ready()
        failure: list[BaseException] = []

        async def probe() -> None:
            try:
                await check_health(LOCAL, port, timeout=30)
            except RpcUnavailable as exc:
                failure.append(exc)

        with trio.fail_after(5):  # far inside the probe's own deadline
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                fake.proc.kill()
    assert len(failure) == 1
    assert "closed the connection" in str(failure[0])


async def test_fake_tei_knobs() -> None:
    async with fake_tei(fail_start="1") as fake:
        assert await fake.wait() == 1
        assert (await fake.stderr()).startswith("Error: Could not download model artifacts")
        while await fake.next_line() is not None:
            pass
        assert all(r["message"] != "Ready" for r in fake.lines)

    async with fake_tei(crash_after="0", exit_code="3") as fake:
        await fake.wait_ready()
        assert await fake.wait() == 3
        assert "Error: fake crash" in await fake.stderr()

    async with fake_tei(ignore_sigterm="1", grandchild="1") as fake:
        port = await fake.wait_ready()
        (pid,) = [int(r["message"][11:]) for r in fake.lines if r["message"][:11] == "grandchild "]
        try:
            assert os.getpgid(pid) == os.getpgid(fake.proc.pid)
            fake.proc.send_signal(signal.SIGTERM)
            # Answering proves the process ran after the signal was delivered.
            assert await check_health(LOCAL, port, timeout=5) is ServingStatus.SERVING
            assert fake.proc.returncode is None
            fake.proc.send_signal(signal.SIGINT)
            assert await fake.wait() == 0
        finally:
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- interop


async def test_grpcio_client_talks_to_the_fake() -> None:
    grpc = pytest.importorskip("grpc", reason="grpcio is the independent client for this test")

    def call(port: int) -> tuple[tei_pb2.InfoResponse, int, Any]:
        with grpc.insecure_channel(f"{LOCAL}:{port}") as channel:
            info = channel.unary_unary(
                "/tei.v1.Info/Info",
                request_serializer=tei_pb2.InfoRequest.SerializeToString,
                response_deserializer=tei_pb2.InfoResponse.FromString,
            )(tei_pb2.InfoRequest(), timeout=5)
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            embed = check(health_pb2.HealthCheckRequest(service="tei.v1.Embed"), timeout=5)
            with pytest.raises(grpc.RpcError) as unknown:
                check(health_pb2.HealthCheckRequest(service="tei.v1.Nope"), timeout=5)
            return info, embed.status, unknown.value.code()

    async with fake_tei() as fake:
        port = await fake.wait_ready()
        info, embed, unknown = await trio.to_thread.run_sync(call, port)
        fake.proc.send_signal(signal.SIGTERM)
        assert await fake.wait() == 0
    assert (info.version, info.model_id) == ("1.9.3", "BAAI/bge-small-en-v1.5")
    assert embed == health_pb2.HealthCheckResponse.SERVING
    assert unknown == grpc.StatusCode.NOT_FOUND


async def test_the_server_enforces_a_grpcio_clients_deadline() -> None:
    grpc = pytest.importorskip("grpc", reason="grpcio sends grpc-timeout; our client cannot")
    slow = SlowInfo()

    def call(port: int) -> Any:
        with grpc.insecure_channel(f"{LOCAL}:{port}") as channel:
            stub = channel.unary_unary(
                "/tei.v1.Info/Info",
                request_serializer=tei_pb2.InfoRequest.SerializeToString,
                response_deserializer=tei_pb2.InfoResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as failed:
                stub(tei_pb2.InfoRequest(), timeout=0.3)
            return failed.value.code()

    async with serving(slow) as (_, port):
        code = await trio.to_thread.run_sync(call, port)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        with trio.fail_after(5):
            await slow.cancelled.wait()  # the handler did not outlive the deadline


# --------------------------------------------------------------------------- call API


async def test_drain_refuses_new_calls_and_waits_for_those_in_flight() -> None:
    release = trio.Event()
    entered = trio.Event()

    async def slow_info(call: ServerCall) -> None:
        request = await call.receive_one()
        entered.set()
        await release.wait()
        await call.send(tei_pb2.InfoResponse(model_id=f"done {type(request).__name__}"))

    service = Service(
        "tei.v1.Info", {"Info": Method(tei_pb2.InfoRequest, tei_pb2.InfoResponse, slow_info)}
    )
    async with serving(service) as (server, port), open_channel(LOCAL, port) as channel:
        answers: list[str] = []

        async def first() -> None:
            reply = await channel.unary(
                "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse, timeout=10
            )
            answers.append(reply.model_id)

        drained = trio.Event()

        async def drain() -> None:
            await server.drain()
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            with trio.fail_after(10):
                await entered.wait()
            nursery.start_soon(drain)
            with pytest.raises(RpcStatusError) as refused, trio.fail_after(10):
                await channel.unary(
                    "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse
                )
            assert (refused.value.code, refused.value.details) == (
                StatusCode.UNAVAILABLE,
                "server is shutting down",
            )
            assert not drained.is_set()
            assert server.in_flight == 1
            release.set()
        assert drained.is_set()
        assert answers == ["done InfoRequest"]
