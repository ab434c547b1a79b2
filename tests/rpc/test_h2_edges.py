"""HTTP/2 edges purerpc gets wrong, against a peer written here with h2 itself.

A raw h2 server answers early (trailers while the request is still being
sent), resets streams with or without an answer, and keeps a small window; a
raw h2 client resets streams with data the handler never read. Every call
must end with the right status at once, the connection must survive, and no
flow-control window may leak.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import purerpc
import pytest
import trio
from hyperframe.frame import WindowUpdateFrame
from purerpc import Cardinality, RPCSignature

from teisup.grpc.pool import BackendPool
from teisup.grpc.service import MultiplexerService
from teisup.proto.tei.v1 import tei_pb2
from teisup.rpc import Server, open_channel
from teisup.rpc import _purerpc as internals

GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def answer_early(reset: h2.errors.ErrorCodes | None, trailers: bool) -> Callable[..., Any]:
    """A server that answers each call on its first frame: trailers, a reset, or both."""

    async def handle(sock: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()  # default 64 KiB window: a big request must wait for it
        await sock.send_all(conn.data_to_send())
        answered: set[int] = set()
        while data := await sock.receive_some(1 << 16):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream_id = getattr(event, "stream_id", 0)
                if not stream_id or stream_id in answered or not conn.streams.get(stream_id):
                    continue
                answered.add(stream_id)
                if trailers:
                    status = [("grpc-status", "3"), ("grpc-message", "bad input")]
                    conn.send_headers(stream_id, GRPC_HEADERS + status, end_stream=True)
                if reset is not None:
                    # A stream both sides have ended cannot be reset any more.
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        conn.reset_stream(stream_id, reset)
            await sock.send_all(conn.data_to_send())

    return handle


@asynccontextmanager
async def raw_server(handle: Callable[..., Any]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


CASES = [
    ("trailers", None, True, "INVALID_ARGUMENT"),
    ("trailers, then RST NO_ERROR", h2.errors.ErrorCodes.NO_ERROR, True, "INVALID_ARGUMENT"),
    ("trailers, then RST CANCEL", h2.errors.ErrorCodes.CANCEL, True, "INVALID_ARGUMENT"),
    ("RST CANCEL alone", h2.errors.ErrorCodes.CANCEL, False, "UNAVAILABLE"),
]


@pytest.mark.parametrize(("case", "reset", "trailers", "code"), CASES, ids=[c[0] for c in CASES])
async def test_an_early_answer_ends_a_big_request_at_once(
    case: str, reset: h2.errors.ErrorCodes | None, trailers: bool, code: str
) -> None:
    """A 1 MiB request stuck on a 64 KiB window: the answer (or reset) ends it."""
    async with (
        raw_server(answer_early(reset, trailers)) as port,
        open_channel("127.0.0.1", port) as channel,
    ):
        for size in (1 << 20, 1):  # the second call proves the connection survived
            request = tei_pb2.EmbedRequest(inputs="x" * size)
            with pytest.raises(purerpc.RpcFailedError) as caught, trio.fail_after(10):
                await channel.unary("tei.v1.Embed", "Embed", request, tei_pb2.EmbedResponse)
            assert caught.value.status.status_code.name == code, caught.value


@pytest.mark.parametrize(("case", "reset", "trailers", "code"), CASES, ids=[c[0] for c in CASES])
async def test_a_stream_answered_early_keeps_the_backend_connection(
    case: str, reset: h2.errors.ErrorCodes | None, trailers: bool, code: str
) -> None:
    """The multiplexer's pipelined backend stream: the status, and no reconnection."""
    async with raw_server(answer_early(reset, trailers)) as port, trio.open_nursery() as nursery:
        pool = BackendPool()
        await nursery.start(pool.run)
        service = MultiplexerService(_NoInstances(), pool, default_timeout=30)
        record = _Record(port)
        requests = [tei_pb2.EmbedRequest(inputs="x" * 8000) for _ in range(200)]
        for _ in range(3):
            with pytest.raises(purerpc.RpcFailedError) as caught, trio.fail_after(10):
                await service.stream_all(
                    record, "tei.v1.Embed", "EmbedStream", requests, tei_pb2.EmbedResponse
                )
            assert caught.value.status.status_code.name == code, caught.value
        assert pool.connects == 1
        nursery.cancel_scope.cancel()


class _NoInstances:
    def all(self) -> list[Any]:
        return []


class _Record:
    def __init__(self, port: int) -> None:
        self.name, self.port, self.pid = "raw", port, 1
        self.spec = type("Spec", (), {"max_concurrent_requests": 8})()


async def late_window_update(sock: trio.SocketStream) -> None:
    """A server that answers each call, and acknowledges its request data late.

    The acknowledgement of call N goes out when call N+1 arrives: by then the
    client has opened a new stream, which makes h2 forget the ended one.
    """
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    await sock.send_all(conn.data_to_send())
    ended: list[int] = []
    while data := await sock.receive_some(1 << 16):
        late = b""
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived) and ended:
                # Allowed by RFC 9113 §6.9; h2 3 itself would refuse to send it.
                frame = WindowUpdateFrame(ended[-1], window_increment=1024)
                late += frame.serialize()
            if isinstance(event, h2.events.StreamEnded):
                status = [("grpc-status", "5"), ("grpc-message", "answered")]
                conn.send_headers(event.stream_id, GRPC_HEADERS + status, end_stream=True)
                ended.append(event.stream_id)
        await sock.send_all(late + conn.data_to_send())


async def test_a_window_update_on_an_ended_stream_leaves_the_connection_alone() -> None:
    async with (
        raw_server(late_window_update) as port,
        open_channel("127.0.0.1", port) as channel,
    ):
        for _ in range(3):
            request = tei_pb2.EmbedRequest(inputs="x")
            with pytest.raises(purerpc.RpcFailedError) as caught, trio.fail_after(10):
                await channel.unary("tei.v1.Embed", "Embed", request, tei_pb2.EmbedResponse)
            assert caught.value.status.status_code.name == "NOT_FOUND"


# --------------------------------------------------------------------------- server side


def unreturned(connection: Any) -> int:
    """Bytes received on the connection and never handed back to the peer's window."""
    window = connection.h2_connection._inbound_flow_control_window_manager
    return int(window.max_window_size - window.current_window_size - window._bytes_processed)


async def test_a_reset_with_unread_data_gives_the_window_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connections: list[Any] = []
    created = internals.TidyConnection.__init__

    def record(self: Any, config: Any) -> None:
        created(self, config)
        connections.append(self)

    monkeypatch.setattr(internals.TidyConnection, "__init__", record)
    started = trio.Event()

    async def never_reads(requests: Any) -> tei_pb2.InfoResponse:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    service = purerpc.Service("test.Slow")
    signature = RPCSignature(Cardinality.STREAM_UNARY, tei_pb2.InfoRequest, tei_pb2.InfoResponse)
    service.add_method("Upload", never_reads, signature)
    server = Server(0)
    server.add_service(service)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_async)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        async with sock:
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            client.increment_flow_control_window(1 << 30)

            async def exchange(until: type) -> None:
                """Send what is pending; read until an event of type ``until`` arrives."""
                await sock.send_all(client.data_to_send())
                while True:
                    data = await sock.receive_some(1 << 20)
                    assert data, "the server closed the connection"
                    events = client.receive_data(data)
                    await sock.send_all(client.data_to_send())
                    if any(isinstance(e, until) for e in events):
                        return

            await exchange(h2.events.RemoteSettingsChanged)
            for declared in (1 << 20, 4 << 20):  # a whole message, then a partial one
                stream_id = client.get_next_available_stream_id()
                client.send_headers(
                    stream_id,
                    [(":method", "POST"), (":scheme", "http"), (":path", "/test.Slow/Upload"),
                     (":authority", "x"), ("te", "trailers"),
                     ("content-type", "application/grpc+proto")],
                )  # fmt: skip
                payload = b"\0" * (1 << 20)
                client.send_data(stream_id, struct.pack(">?I", False, declared) + payload)
                client.ping(b"data-in.")
                await exchange(h2.events.PingAckReceived)
                assert unreturned(connections[-1]) > 0  # received, unread
                client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                # The server handles frames in order: the reset is done by the ack.
                client.ping(b"reset-in")
                await exchange(h2.events.PingAckReceived)
                assert unreturned(connections[-1]) == 0
                assert connections[-1].streams == {}
        nursery.cancel_scope.cancel()
    assert started.is_set()
