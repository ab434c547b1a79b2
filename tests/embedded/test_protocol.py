"""TEI's protocol on tiny random-weight models, served in-process on a real socket.

The models are 2-layer BERTs with random weights (see ``tiny_models``): the
scores mean nothing, so these tests check shapes, ordering, sparsity, status
codes and messages, concurrency limits and auth, not quality.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from teisup.embedded.app import Serving, TeiLog, serve
from teisup.embedded.cli import parse_settings
from teisup.embedded.engine import Engine, load_engine
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import (
    Channel,
    RpcStatusError,
    ServingStatus,
    StatusCode,
    call_once,
    check_health,
)

pytestmark = pytest.mark.slow  # imports torch and builds models (a few seconds)

_ENGINES: dict[tuple[str, str | None], Engine] = {}


def engine_for(path: Path, pooling: str | None = None) -> Engine:
    # Loaded once per model for the whole session: loading is the slow part.
    key = (str(path), pooling)
    if key not in _ENGINES:
        _ENGINES[key] = load_engine(path, pooling=pooling)
    return _ENGINES[key]


class Served:
    def __init__(self, serving: Serving, engine: Engine) -> None:
        self.port = serving.port
        self.prometheus_port = serving.prometheus_port
        self.permits: trio.Semaphore = serving.batcher.permits
        self.engine = engine

    async def call(self, fn: Callable[[Channel], Awaitable[Any]]) -> Any:
        return await call_once("127.0.0.1", self.port, fn, timeout=30)


@asynccontextmanager
async def served(path: Path, *flags: str, pooling: str | None = None) -> AsyncIterator[Served]:
    argv = ["--model-id", str(path), "--hostname", "127.0.0.1", "--port", "0"]
    argv += ["--prometheus-port", "0", *flags]
    if pooling:
        argv += ["--pooling", pooling]
    settings = parse_settings(argv, env={})
    engine = engine_for(path, pooling)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(
            lambda task_status: serve(
                settings, engine, TeiLog(True), stop=stop, task_status=task_status
            )
        )
        try:
            yield Served(serving, engine)
        finally:
            stop.set()


async def status_of(call: Awaitable[Any]) -> RpcStatusError:
    with pytest.raises(RpcStatusError) as err:
        await call
    return err.value


async def test_sparse_embeddings_are_non_zero_only(tiny_models: dict[str, Path]) -> None:
    async with served(tiny_models["splade"], pooling="splade") as server:
        response = await server.call(
            lambda ch: tei_grpc.EmbedStub(ch).EmbedSparse(
                tei_pb2.EmbedSparseRequest(inputs="the capital of france")
            )
        )
        values = response.sparse_embeddings
        assert values
        assert all(v.value != 0 for v in values)
        assert all(0 <= v.index < server.engine.dimensions for v in values)
        assert [v.index for v in values] == sorted({v.index for v in values})
        # The same vector, dense, through Embed (normalize is refused for SPLADE).
        dense = await server.call(
            lambda ch: tei_grpc.EmbedStub(ch).Embed(
                tei_pb2.EmbedRequest(inputs="the capital of france", normalize=False)
            )
        )
        assert len(dense.embeddings) == server.engine.dimensions
        assert sum(1 for x in dense.embeddings if x != 0) == len(values)
        # Unset means true in TEI 1.9, so it is refused as an explicit true is.
        for request in (
            tei_pb2.EmbedRequest(inputs="x", normalize=True),
            tei_pb2.EmbedRequest(inputs="x"),
        ):
            err = await status_of(
                server.call(lambda ch, r=request: tei_grpc.EmbedStub(ch).Embed(r))
            )
            assert err.code_name == "FAILED_PRECONDITION"
            assert err.details == "Backend error: `normalize` is not available for SPLADE models"
        err = await status_of(
            server.call(
                lambda ch: tei_grpc.EmbedStub(ch).EmbedAll(tei_pb2.EmbedAllRequest(inputs="x"))
            )
        )
        assert err.details == "Backend error: `embed_all` is not available for SPLADE models"


async def test_rerank_sorts_and_limits(tiny_models: dict[str, Path]) -> None:
    async with served(tiny_models["reranker"], "--max-client-batch-size", "3") as server:
        texts = ["paris is in france", "bananas are yellow", "the eiffel tower"]

        async def rerank(ch: Channel, **kw: Any) -> Any:
            request = tei_pb2.RerankRequest(query="capital of france", texts=texts, **kw)
            return await tei_grpc.RerankStub(ch).Rerank(request)

        response = await server.call(lambda ch: rerank(ch, return_text=True))
        scores = [r.score for r in response.ranks]
        assert scores == sorted(scores, reverse=True)
        assert sorted(r.index for r in response.ranks) == [0, 1, 2]
        assert all(r.text == texts[r.index] for r in response.ranks)
        assert all(0 < s < 1 for s in scores)  # sigmoid unless raw_scores
        bare = await server.call(lambda ch: rerank(ch))
        assert not any(r.HasField("text") for r in bare.ranks)
        raw = await server.call(lambda ch: rerank(ch, raw_scores=True))
        assert {r.index: r.score for r in raw.ranks} != {r.index: r.score for r in bare.ranks}

        too_many = tei_pb2.RerankRequest(query="q", texts=["a", "b", "c", "d"])
        err = await status_of(server.call(lambda ch: tei_grpc.RerankStub(ch).Rerank(too_many)))
        assert (err.code_name, err.details) == (
            "INVALID_ARGUMENT",
            "batch size 4 > maximum allowed batch size 3",
        )
        empty = tei_pb2.RerankRequest(query="q")
        err = await status_of(server.call(lambda ch: tei_grpc.RerankStub(ch).Rerank(empty)))
        assert (err.code_name, err.details) == ("INVALID_ARGUMENT", "`texts` cannot be empty")

        async def stream(ch: Channel) -> Any:
            async def messages() -> AsyncIterator[tei_pb2.RerankStreamRequest]:
                for i, text in enumerate(texts * 2):  # no batch-size limit on the stream
                    yield tei_pb2.RerankStreamRequest(
                        query="capital of france", text=text, return_text=i == 0
                    )

            return await tei_grpc.RerankStub(ch).RerankStream(messages())

        streamed = await server.call(stream)
        assert len(streamed.ranks) == 6
        assert all(r.HasField("text") for r in streamed.ranks)  # from the first message

        err = await status_of(
            server.call(lambda ch: tei_grpc.EmbedStub(ch).Embed(tei_pb2.EmbedRequest(inputs="x")))
        )
        assert (err.code_name, err.details) == (
            "FAILED_PRECONDITION",
            "Backend error: Model is not an embedding model",
        )
        for service, expected in [
            ("tei.v1.Predict", ServingStatus.SERVING),
            ("tei.v1.Rerank", ServingStatus.SERVING),
            ("tei.v1.Embed", ServingStatus.NOT_SERVING),
        ]:
            assert (
                await check_health("127.0.0.1", server.port, service=service, timeout=10)
                == expected
            )


async def test_classifier_predicts_every_label(tiny_models: dict[str, Path]) -> None:
    async with served(tiny_models["classifier"]) as server:
        response = await server.call(
            lambda ch: tei_grpc.PredictStub(ch).Predict(tei_pb2.PredictRequest(inputs="great film"))
        )
        labels = [p.label for p in response.predictions]
        assert sorted(labels) == ["NEG", "NEU", "POS"]
        scores = [p.score for p in response.predictions]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # softmax over the labels
        pair = tei_pb2.PredictPairRequest(inputs=["a", "b"])
        paired = await server.call(lambda ch: tei_grpc.PredictStub(ch).PredictPair(pair))
        assert len(paired.predictions) == 3
        three = tei_pb2.PredictPairRequest(inputs=["a", "b", "c"])
        err = await status_of(server.call(lambda ch: tei_grpc.PredictStub(ch).PredictPair(three)))
        assert (err.code_name, err.details) == (
            "INVALID_ARGUMENT",
            "`inputs` must have a single or two elements. Given: 3",
        )
        rerank = tei_pb2.RerankRequest(query="q", texts=["a"])
        err = await status_of(server.call(lambda ch: tei_grpc.RerankStub(ch).Rerank(rerank)))
        assert (err.code_name, err.details) == (
            "FAILED_PRECONDITION",
            "model is not a re-ranker model",
        )


async def test_overload_auth_and_embed_all(tiny_models: dict[str, Path]) -> None:
    flags = ("--max-concurrent-requests", "1", "--api-key", "s3cret")
    async with served(tiny_models["dense"], *flags) as server:
        auth = [("authorization", "Bearer s3cret")]
        request = tei_pb2.EmbedRequest(inputs="hello")
        err = await status_of(server.call(lambda ch: tei_grpc.EmbedStub(ch).Embed(request)))
        assert (err.code_name, err.details) == ("UNAUTHENTICATED", "No valid auth token")
        wrong = [("authorization", "Bearer nope")]
        err = await status_of(
            server.call(lambda ch: tei_grpc.EmbedStub(ch).Embed(request, metadata=wrong))
        )
        assert err.code_name == "UNAUTHENTICATED"
        # Health needs no key.
        assert await check_health("127.0.0.1", server.port, timeout=10) == ServingStatus.SERVING
        ok = await server.call(lambda ch: tei_grpc.EmbedStub(ch).Embed(request, metadata=auth))
        assert len(ok.embeddings) == 32

        everything = await server.call(
            lambda ch: tei_grpc.EmbedStub(ch).EmbedAll(
                tei_pb2.EmbedAllRequest(inputs="hello world"), metadata=auth
            )
        )
        assert [len(t.embeddings) for t in everything.token_embeddings] == [32] * 4

        info = await server.call(
            lambda ch: tei_grpc.InfoStub(ch).Info(tei_pb2.InfoRequest(), metadata=auth)
        )
        assert (info.max_concurrent_requests, info.max_input_length) == (1, 64)

        async def stream(ch: Channel, count: int) -> list[Any]:
            calls = await tei_grpc.EmbedStub(ch).EmbedStream(metadata=auth)
            for i in range(count):
                await calls.send_message(tei_pb2.EmbedRequest(inputs=f"text {i}"))
            await calls.close()
            answers = []
            while (answer := await calls.receive_message()) is not None:
                answers.append(answer)
            status = calls.end_stream_event.status
            if status.status_code.name != "OK":
                raise RpcStatusError(StatusCode[status.status_code.name], status.status_message)
            return answers

        # The one permit taken by another call: a unary embed and a stream are
        # both refused at once (TEI 1.9), not queued.
        server.permits.acquire_nowait()
        try:
            err = await status_of(
                server.call(lambda ch: tei_grpc.EmbedStub(ch).Embed(request, metadata=auth))
            )
            assert (err.code_name, err.details) == ("RESOURCE_EXHAUSTED", "Model is overloaded")
            with trio.fail_after(10):  # at once: nothing waits for the permit
                err = await status_of(server.call(lambda ch: stream(ch, 3)))
            assert (err.code_name, err.details) == ("RESOURCE_EXHAUSTED", "Model is overloaded")
        finally:
            server.permits.release()
        # A stream longer than the permits waits for its own: throttled, not refused.
        answers = await server.call(lambda ch: stream(ch, 6))
        assert [len(a.embeddings) for a in answers] == [32] * 6
        assert server.permits.value == 1
