"""The real model over the wire: a server process driven by grpcio clients.

One ``python -m teisup.embedded`` process serves all-MiniLM-L6-v2 (the packaged
weights) for the whole module; ``grpcio`` stubs generated from the proto talk
to it. Results are compared with ``SentenceTransformer.encode`` in this process.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.grpc.reflection.v1alpha import reflection_pb2

from .conftest import MINILM_DIR, ServerProcess, needs_minilm

pytestmark = [pytest.mark.slow, needs_minilm]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Supervision trees restart what fails.",
    "héllo wörld, ünïcode ✓",
]


@pytest.fixture(scope="module")
def reference() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM_DIR), device="cpu")


@pytest.fixture
def channel(minilm_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(minilm_server.target) as ch:
        yield ch


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("normalize", [None, False, True])
def test_embed_matches_sentence_transformers(
    channel: grpc.Channel,
    grpc_stubs: tuple[ModuleType, ModuleType],
    reference: Any,
    normalize: bool | None,
) -> None:
    pb2, pb2_grpc = grpc_stubs
    stub = pb2_grpc.EmbedStub(channel)
    expected = reference.encode(SENTENCES)
    for sentence, want in zip(SENTENCES, expected, strict=True):
        response, call = stub.Embed.with_call(
            pb2.EmbedRequest(inputs=sentence, normalize=normalize)
        )
        got = np.asarray(response.embeddings)
        assert got.shape == (384,)
        assert cosine(got, want) > 0.9999
        # TEI 1.9: unset normalizes; an explicit false is the raw pooled vector.
        assert bool(abs(np.linalg.norm(got) - 1) < 1e-4) == (normalize is not False)
        headers = dict(call.initial_metadata())
        assert headers["x-compute-type"] == "gpu+optimized"
        assert int(headers["x-compute-tokens"]) == response.metadata.compute_tokens > 2
        assert response.metadata.compute_chars == len(sentence)


def test_embed_stream_keeps_order(
    channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType], reference: Any
) -> None:
    pb2, pb2_grpc = grpc_stubs
    texts = [f"sentence number {i} about {SENTENCES[i % 5]}" for i in range(40)]
    expected = reference.encode(texts)
    requests = iter([pb2.EmbedRequest(inputs=t) for t in texts])
    answers = list(pb2_grpc.EmbedStub(channel).EmbedStream(requests))
    assert len(answers) == len(texts)
    for answer, want in zip(answers, expected, strict=True):
        assert cosine(answer.embeddings, want) > 0.9999


def test_dimensions_truncate_then_normalize(
    channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType]
) -> None:
    pb2, pb2_grpc = grpc_stubs
    stub = pb2_grpc.EmbedStub(channel)
    full = np.asarray(stub.Embed(pb2.EmbedRequest(inputs="matryoshka", normalize=False)).embeddings)
    short = stub.Embed(pb2.EmbedRequest(inputs="matryoshka", dimensions=64, normalize=True))
    assert len(short.embeddings) == 64
    assert np.allclose(short.embeddings, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)
    for dims, message in [(0, "should be positive"), (385, "should be smaller")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb2.EmbedRequest(inputs="x", dimensions=dims))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


def test_bad_inputs(channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType]) -> None:
    pb2, pb2_grpc = grpc_stubs
    stub = pb2_grpc.EmbedStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb2.EmbedRequest(inputs=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "Input validation error: `inputs` cannot be empty"

    long_text = "word " * 400  # ~400 tokens, over MiniLM's 256
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb2.EmbedRequest(inputs=long_text))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "Input validation error: `inputs` must have less than 256 tokens. Given: 402"
    )
    truncated = stub.Embed(pb2.EmbedRequest(inputs=long_text, truncate=True))
    assert truncated.metadata.compute_tokens == 256

    # Wrong model type: FAILED_PRECONDITION, as TEI answers.
    with pytest.raises(grpc.RpcError) as err:
        pb2_grpc.RerankStub(channel).Rerank(pb2.RerankRequest(query="q", texts=["a"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "model is not a classifier model"
    with pytest.raises(grpc.RpcError) as err:
        pb2_grpc.EmbedStub(channel).EmbedSparse(pb2.EmbedSparseRequest(inputs="x"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The first error ends a stream; the answers before it arrive, in order.
    requests = iter(
        [
            pb2.EmbedRequest(inputs="fine"),
            pb2.EmbedRequest(inputs=""),
            pb2.EmbedRequest(inputs="never"),
        ]
    )
    answers: list[Any] = []

    def consume() -> None:
        answers.extend(stub.EmbedStream(requests))

    with pytest.raises(grpc.RpcError) as err:
        consume()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(answers) == 1


def test_embed_all_gives_every_token(
    channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType]
) -> None:
    pb2, pb2_grpc = grpc_stubs
    response = pb2_grpc.EmbedStub(channel).EmbedAll(pb2.EmbedAllRequest(inputs="hello world"))
    assert len(response.token_embeddings) == 4  # [CLS] hello world [SEP]
    assert all(len(t.embeddings) == 384 for t in response.token_embeddings)


def test_tokenize_decode_round_trip(
    channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType]
) -> None:
    pb2, pb2_grpc = grpc_stubs
    stub = pb2_grpc.TokenizeStub(channel)
    text = "héllo world"
    bare = stub.Tokenize(pb2.EncodeRequest(inputs=text))  # add_special_tokens defaults to false
    assert [t.special for t in bare.tokens] == [False] * len(bare.tokens)
    special = stub.Tokenize(pb2.EncodeRequest(inputs=text, add_special_tokens=True))
    assert (special.tokens[0].text, special.tokens[0].special) == ("[CLS]", True)
    assert not special.tokens[0].HasField("start")
    # Byte offsets into the UTF-8 input ("é" is two bytes).
    raw = text.encode()
    for token in bare.tokens:
        assert raw[token.start : token.stop].decode() == token.text
    assert bare.tokens[-1].stop == len(raw)
    ids = [t.id for t in special.tokens]
    assert stub.Decode(pb2.DecodeRequest(ids=ids, skip_special_tokens=True)).text == "hello world"
    assert stub.Decode(pb2.DecodeRequest(ids=ids)).text == "[CLS] hello world [SEP]"
    streamed = list(stub.DecodeStream(iter([pb2.DecodeRequest(ids=ids[1:2])] * 3)))
    assert [d.text for d in streamed] == ["hello"] * 3


def test_info(channel: grpc.Channel, grpc_stubs: tuple[ModuleType, ModuleType]) -> None:
    pb2, pb2_grpc = grpc_stubs
    info = pb2_grpc.InfoStub(channel).Info(pb2.InfoRequest())
    # TEI's version first (clients compare it), teisup's as build metadata.
    assert info.version.startswith("1.9.3+teisup.")
    assert info.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert info.model_type == pb2.MODEL_TYPE_EMBEDDING
    assert info.max_input_length == 256
    assert info.model_dtype == "float32"
    assert (info.max_batch_tokens, info.max_client_batch_size) == (16384, 4)
    assert not info.HasField("max_batch_requests")
    assert not info.HasField("model_sha")


def test_health_reflection_and_metrics(channel: grpc.Channel, minilm_server: ServerProcess) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    expected = {
        "": serving,
        "tei.v1.Info": serving,
        "tei.v1.Tokenize": serving,
        "tei.v1.Embed": serving,
        "tei.v1.Predict": not_serving,
        "tei.v1.Rerank": not_serving,
    }
    for service, status in expected.items():
        assert check(health_pb2.HealthCheckRequest(service=service)).status == status
    with pytest.raises(grpc.RpcError) as err:
        check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listing, symbol = reflect(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="tei.v1.Embed"),
            ]
        )
    )
    names = {s.name for s in listing.list_services_response.service}
    assert names == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "tei.v1.Embed",
        "tei.v1.Info",
        "tei.v1.Predict",
        "tei.v1.Rerank",
        "tei.v1.Tokenize",
    }
    from google.protobuf import descriptor_pb2

    (file_bytes,) = symbol.file_descriptor_response.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(file_bytes)
    assert proto.package == "tei.v1"
    assert "Embed" in [s.name for s in proto.service]

    base = f"http://127.0.0.1:{minilm_server.prometheus_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
        assert answer.read() == b"OK"
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "# TYPE te_request_count counter" in text
    assert 'te_request_success{method="single"}' in text
    assert "te_embed_inference_duration_bucket" in text
    assert "_total" not in text
