"""End to end with the real model: the multiplexer gives what the instance gives.

One embedded backend (``sentence-transformers/all-MiniLM-L6-v2``) serves the
whole module; the multiplexer runs in each test's Trio run in front of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pyarrow as pa
import pytest
import trio

from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux
from teisup.rpc import Channel, RpcStatusError, call_once
from teisup.supervision import ChildState

from .conftest import MINILM, Backend, Instances, call, running_mux, target

pytestmark = pytest.mark.slow

T = TypeVar("T")

TEXTS = [
    "The cat sat on the mat.",
    "Embeddings map text to vectors.",
    "Trio is a library for async concurrency.",
    "",  # TEI refuses empty input: the error must pass through
]
GOOD = TEXTS[:3]


async def direct(backend: Backend, fn: Callable[[Channel], Awaitable[T]]) -> T:
    return await call_once("127.0.0.1", backend.port, fn, timeout=60)


def arrow_texts(texts: list[str]) -> bytes:
    table = pa.table({"text": pa.array(texts, pa.string())})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


async def test_unary_rpcs_equal_the_instance(minilm_backend: Backend) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    async with running_mux(instances) as m:
        info = await call(m, lambda s: s.Info(mux.InfoRequest(target=target("minilm"))))
        assert info == await direct(
            minilm_backend, lambda c: tei_grpc.InfoStub(c).Info(tei_pb2.InfoRequest())
        )

        for text in GOOD:
            inner = tei_pb2.EmbedRequest(inputs=text, normalize=True)
            got = await call(
                m, lambda s, i=inner: s.Embed(mux.EmbedRequest(target=target("minilm"), request=i))
            )
            want = await direct(minilm_backend, lambda c, i=inner: tei_grpc.EmbedStub(c).Embed(i))
            assert list(got.embeddings) == list(want.embeddings)
            assert len(got.embeddings) == 384

        encode = tei_pb2.EncodeRequest(inputs=GOOD[0], add_special_tokens=True)
        tokens = await call(
            m, lambda s: s.Tokenize(mux.EncodeRequest(target=target("minilm"), request=encode))
        )
        assert tokens == await direct(
            minilm_backend, lambda c: tei_grpc.TokenizeStub(c).Tokenize(encode)
        )

        ids = [t.id for t in tokens.tokens]
        decode = tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=True)
        text = await call(
            m, lambda s: s.Decode(mux.DecodeRequest(target=target("minilm"), request=decode))
        )
        assert text.text == "the cat sat on the mat."


async def test_backend_errors_pass_through_with_code_and_message(minilm_backend: Backend) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    async with running_mux(instances) as m:
        cases: list[tuple[Callable[[Any], Awaitable[Any]], Callable[[Channel], Awaitable[Any]]]] = [
            (
                lambda s: s.EmbedSparse(
                    mux.EmbedSparseRequest(
                        target=target("minilm"), request=tei_pb2.EmbedSparseRequest(inputs="x")
                    )
                ),
                lambda c: tei_grpc.EmbedStub(c).EmbedSparse(tei_pb2.EmbedSparseRequest(inputs="x")),
            ),
            (
                lambda s: s.Embed(
                    mux.EmbedRequest(
                        target=target("minilm"), request=tei_pb2.EmbedRequest(inputs="")
                    )
                ),
                lambda c: tei_grpc.EmbedStub(c).Embed(tei_pb2.EmbedRequest(inputs="")),
            ),
        ]
        for through, straight in cases:
            with pytest.raises(RpcStatusError) as via_mux:
                await call(m, through)
            with pytest.raises(RpcStatusError) as via_instance:
                await direct(minilm_backend, straight)
            assert (via_mux.value.code_name, via_mux.value.details) == (
                via_instance.value.code_name,
                via_instance.value.details,
            )


async def test_embed_stream_keeps_order(minilm_backend: Backend) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    texts = [
        f"sentence number {i} about {w}"
        for i, w in enumerate(["cats", "dogs", "rain", "code", "tea"] * 2)
    ]
    async with running_mux(instances) as m:

        async def stream(s: Any) -> list[list[float]]:
            calls = await s.EmbedStream()
            out: list[list[float]] = []
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for i, text in enumerate(texts):
                        # Only the first message's target counts.
                        t = target("minilm") if i == 0 else target("ignored")
                        await calls.send_message(
                            mux.EmbedRequest(target=t, request=tei_pb2.EmbedRequest(inputs=text))
                        )
                    await calls.close()

                nursery.start_soon(send)
                while (answer := await calls.receive_message()) is not None:
                    out.append(list(answer.embeddings))
            assert calls.end_stream_event.status.status_code.name == "OK"
            return out

        got = await call(m, stream)
        assert len(got) == len(texts)
        for text, embedding in zip(texts, got, strict=True):
            want = await direct(
                minilm_backend,
                lambda c, t=text: tei_grpc.EmbedStub(c).Embed(tei_pb2.EmbedRequest(inputs=t)),
            )
            assert embedding == pytest.approx(list(want.embeddings), abs=1e-5)


async def test_embed_arrow_rows_equal_per_text_embed(minilm_backend: Backend) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    texts = GOOD * 3
    async with running_mux(instances) as m:
        for normalize in (True, False):
            request = mux.EmbedArrowRequest(
                target=target("minilm"), arrow_ipc=arrow_texts(texts), normalize=normalize
            )
            answer = await call(m, lambda s, r=request: s.EmbedArrow(r))
            table = pa.ipc.open_stream(answer.arrow_ipc).read_all()
            assert table.schema.field(0).type == pa.list_(
                pa.field("item", pa.float32(), nullable=False), 384
            )
            rows = table.column(0).to_pylist()
            assert len(rows) == len(texts)
            for text, row in zip(texts, rows, strict=True):
                want = await direct(
                    minilm_backend,
                    lambda c, t=text, n=normalize: tei_grpc.EmbedStub(c).Embed(
                        tei_pb2.EmbedRequest(inputs=t, normalize=n)
                    ),
                )
                assert row == pytest.approx(list(want.embeddings), abs=1e-5)
        # A sparse Arrow request to a dense model: the backend's refusal, as is.
        sparse = mux.EmbedSparseArrowRequest(target=target("minilm"), arrow_ipc=arrow_texts(GOOD))
        with pytest.raises(RpcStatusError) as caught:
            await call(m, lambda s: s.EmbedSparseArrow(sparse))
        assert caught.value.code_name == "FAILED_PRECONDITION"


async def test_model_id_routing_uses_every_ready_replica(minilm_backend: Backend) -> None:
    instances = Instances(
        minilm_backend.record("replica-a", model_id=MINILM),
        minilm_backend.record("replica-b", model_id=MINILM),
        minilm_backend.record("replica-c", model_id=MINILM, status=ChildState.STARTING),
    )
    async with running_mux(instances) as m:
        by_model = mux.EmbedRequest(
            target=mux.Target(model_id=MINILM), request=tei_pb2.EmbedRequest(inputs="hi")
        )
        for _ in range(4):
            await call(m, lambda s: s.Embed(by_model))
        # Both running replicas got a connection (and traffic); the starting one none.
        assert m.service._last_picked.keys() == {"replica-a", "replica-b"}
        assert m.pool.connects == 2
        # One replica goes down: the model keeps being served by the other.
        instances.update("replica-a", status=ChildState.BACKOFF)
        for _ in range(2):
            await call(m, lambda s: s.Embed(by_model))
        assert m.pool.connects == 2


def grpcio_calls(
    port: int, stubs: SimpleNamespace, texts: list[str]
) -> tuple[Any, list[Any], bytes]:
    """Embed, EmbedStream and EmbedArrow with grpcio, in a worker thread."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
        t = stubs.pb2.Target(instance_name="minilm")
        one = stub.Embed(
            stubs.pb2.EmbedRequest(target=t, request=stubs.tei_pb2.EmbedRequest(inputs=texts[0])),
            timeout=60,
        )
        many = list(
            stub.EmbedStream(
                iter(
                    [
                        stubs.pb2.EmbedRequest(
                            target=t, request=stubs.tei_pb2.EmbedRequest(inputs=x)
                        )
                        for x in texts
                    ]
                ),
                timeout=60,
            )
        )
        table = arrow_texts(texts)
        # EmbedArrow's normalize is a plain bool (no unset): true to match the unset ones.
        arrow = stubs.pb2.EmbedArrowRequest(target=t, arrow_ipc=table, normalize=True)
        batch = stub.EmbedArrow(arrow, timeout=60)
        return one, many, batch.arrow_ipc


async def test_a_grpcio_client(minilm_backend: Backend, mux_stubs: SimpleNamespace) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    async with running_mux(instances) as m:
        one, many, arrow_ipc = await trio.to_thread.run_sync(grpcio_calls, m.port, mux_stubs, GOOD)
    assert len(one.embeddings) == 384
    assert [len(r.embeddings) for r in many] == [384] * len(GOOD)
    assert list(many[0].embeddings) == pytest.approx(list(one.embeddings), abs=1e-5)
    rows = pa.ipc.open_stream(arrow_ipc).read_all().column(0).to_pylist()
    assert [
        row == pytest.approx(list(r.embeddings), abs=1e-5)
        for row, r in zip(rows, many, strict=True)
    ] == [True] * 3


async def test_a_call_abandoned_at_its_deadline_leaves_the_connection_usable(
    minilm_backend: Backend,
) -> None:
    import datetime

    from teisup.rpc import open_channel

    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    texts = [f"a somewhat longer sentence, number {i}, to keep the model busy" for i in range(200)]
    async with running_mux(instances) as m:
        async with open_channel("127.0.0.1", m.port) as channel:
            stream = await channel._grpc_socket.start_request(
                "http",
                "tei_multiplexer.v1.TeiMultiplexer",
                "EmbedArrow",
                "tei_multiplexer.v1.EmbedArrowRequest",
                "127.0.0.1",
                timeout=datetime.timedelta(seconds=0.2),
            )
            stream.expect_message_type(mux.EmbedArrowResponse)
            await stream.send_message(
                mux.EmbedArrowRequest(target=target("minilm"), arrow_ipc=arrow_texts(texts))
            )
            await stream.close()
            with trio.fail_after(30):
                assert await stream.receive_message() is None
            assert stream.end_stream_event.status.status_code.name == "DEADLINE_EXCEEDED"
        # The backend stream was reset; whatever the backend still sends for it
        # is dropped, and the same connection serves the next calls.
        request = mux.EmbedRequest(
            target=target("minilm"), request=tei_pb2.EmbedRequest(inputs="still alive")
        )
        for _ in range(3):
            answer = await call(m, lambda s: s.Embed(request))
            assert len(answer.embeddings) == 384
        assert m.pool.connects == 1
