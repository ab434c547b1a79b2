"""The data plane over HTTP, for clients without gRPC.

Routes on the REST port, all through the multiplexer's routing, backend pool,
in-flight caps and deadlines (`teisup.grpc.MultiplexerService`):

* ``POST /instances/<name>/embed``, ``/embed_sparse``, ``/rerank``,
  ``/tokenize``: TEI's HTTP JSON request and response shapes (TEI 1.8's
  ``/embed`` ... routes), forwarded to the instance's ``tei.v1`` service; a
  batch of inputs goes over one stream and comes back in order;
* ``POST /v1/embeddings``: OpenAI's embeddings API; ``model`` is an instance
  name, or else a model id (spread over its ready replicas as gRPC
  ``model_id`` routing is). Inputs are always normalised and truncated to the
  model's length (OpenAI clients do not cut texts to a local model's limit).

TEI's routes answer errors as ``{"error", "error_type", "code", "timestamp"}``
(TEI's two fields and teisup's); ``/v1/embeddings`` answers OpenAI's
``{"error": {"message", "type", "code"}}``. The status follows the backend's
gRPC code: INVALID_ARGUMENT 422, NOT_FOUND 404, UNAVAILABLE 503,
RESOURCE_EXHAUSTED 429, DEADLINE_EXCEEDED 504, FAILED_PRECONDITION /
UNIMPLEMENTED / INTERNAL 424, anything else 502.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from ..grpc import MultiplexerService
from ..proto.tei.v1 import tei_pb2
from ..proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2
from ..rpc import RpcStatusError, StatusCode
from .errors import OpenAIError, OpenAIErrorDetail, TeiError
from .jsonbody import JsonTooDeep, decode_json
from .responses import json_response as _json
from .responses import now as _now

__all__ = ["MAX_BATCH", "add_data_plane"]

MAX_BATCH = 4096
"""The most inputs one HTTP request may carry."""
MAX_DIMENSIONS = 1 << 16
"""The largest ``dimensions`` (Matryoshka truncation) a request may ask for."""

_STATUS: dict[int, tuple[int, str]] = {
    StatusCode.INVALID_ARGUMENT: (422, "Validation"),
    StatusCode.NOT_FOUND: (404, "NotFound"),
    StatusCode.UNAVAILABLE: (503, "Unhealthy"),
    StatusCode.RESOURCE_EXHAUSTED: (429, "Overloaded"),
    StatusCode.DEADLINE_EXCEEDED: (504, "Timeout"),
    StatusCode.FAILED_PRECONDITION: (424, "Backend"),
    StatusCode.UNIMPLEMENTED: (424, "Backend"),
    StatusCode.INTERNAL: (424, "Backend"),
}

B = TypeVar("B")
Direction = Literal["Right", "Left"]
#: TEI's ``dimensions`` is a uint32 on the wire; a model has far fewer.
Dimensions = Annotated[int, msgspec.Meta(ge=1, le=MAX_DIMENSIONS)]


class EmbedBody(msgspec.Struct):
    """TEI's ``/embed`` body (``/embed_sparse`` ignores normalize and dimensions)."""

    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    normalize: bool | None = None
    """Absent (or null): left unset on the ``tei.v1`` request, which means true (TEI 1.9)."""
    dimensions: Dimensions | None = None


class RerankBody(msgspec.Struct):
    """TEI's ``/rerank`` body."""

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    raw_scores: bool = False
    return_text: bool = False


class TokenizeBody(msgspec.Struct):
    """TEI's ``/tokenize`` body."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class OpenAIEmbeddingsBody(msgspec.Struct):
    """OpenAI's ``/v1/embeddings`` body."""

    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: str | None = None


class DataPlaneError(Exception):
    """A refused request: HTTP status, TEI error type, gRPC-style code, message."""

    def __init__(self, status: int, error_type: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.message = message

    def tei_body(self) -> TeiError:
        """TEI's error fields and teisup's."""
        return TeiError(self.message, self.error_type, self.code, _now())

    def openai_body(self) -> OpenAIError:
        """OpenAI's error shape."""
        return OpenAIError(OpenAIErrorDetail(self.message, self.error_type, self.code))

    @classmethod
    def from_status(cls, exc: RpcStatusError) -> DataPlaneError:
        http, error_type = _STATUS.get(exc.code, (502, "Backend"))
        return cls(http, error_type, exc.code_name, exc.details)


def _direction(name: str) -> Any:
    return (
        tei_pb2.TRUNCATION_DIRECTION_LEFT if name == "Left" else tei_pb2.TRUNCATION_DIRECTION_RIGHT
    )


def _inputs(value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", "`inputs` cannot be empty")
    if len(texts) > MAX_BATCH:
        raise DataPlaneError(
            422,
            "Validation",
            "INVALID_ARGUMENT",
            f"batch size {len(texts)} > maximum allowed batch size {MAX_BATCH}",
        )
    return texts


async def _decode(kind: type[B]) -> B:
    try:
        body = await request.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise DataPlaneError(
            413, "Validation", "RESOURCE_EXHAUSTED", f"request body over {limit} bytes"
        ) from None
    assert isinstance(body, bytes)
    try:
        data = decode_json(body)
    except JsonTooDeep as exc:
        raise DataPlaneError(400, "Validation", "INVALID_ARGUMENT", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise DataPlaneError(
            400, "Validation", "INVALID_ARGUMENT", f"malformed JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise DataPlaneError(
            422, "Validation", "INVALID_ARGUMENT", "the body must be a JSON object"
        )
    for key in ("inputs", "input"):
        value = data.get(key)
        if isinstance(value, list) and any(not isinstance(v, str) for v in value):
            raise DataPlaneError(
                422,
                "Validation",
                "INVALID_ARGUMENT",
                f"`{key}` must be a string or a list of strings: pre-tokenized inputs "
                "(token ids) are not supported through teisup",
            )
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise DataPlaneError(422, "Validation", "INVALID_ARGUMENT", str(exc)) from None


def add_data_plane(app: QuartTrio, data: MultiplexerService, *, max_body: int) -> None:
    """Register the data-plane routes on ``app``, served by ``data``.

    Request bodies up to ``max_body`` bytes are accepted (the control plane's
    own routes keep their smaller limit).
    """
    app.config["MAX_CONTENT_LENGTH"] = max(app.config.get("MAX_CONTENT_LENGTH") or 0, max_body)

    async def many(
        target: mux_pb2.Target, service: str, unary_method: str, stream_method: str,
        requests: list[Any], response_type: Any,
    ) -> list[Any]:  # fmt: skip
        """Route ``target``; one request as a unary call (with failover), more over one stream."""
        record = data.route(target)
        if len(requests) > 1:
            return await data.stream_all(record, service, stream_method, requests, response_type)
        answer = await data.forward(
            target, service, unary_method, requests[0], response_type, routed=record
        )
        return [answer]

    async def answer(
        method: str,
        produce: Callable[[], Awaitable[Any]],
        error_body: Callable[[DataPlaneError], Any],
    ) -> Response:
        """``produce()`` as JSON, or its error as ``error_body`` gives it; observed either way."""
        with data.observe("http", method) as record:
            try:
                return _json(await produce())
            except RpcStatusError as exc:
                error = DataPlaneError.from_status(exc)
            except DataPlaneError as exc:
                error = exc
            record.code = error.code
        return _json(error_body(error), error.status)

    def tei_route(method: str, serve: Callable[[mux_pb2.Target], Awaitable[Any]]) -> None:
        async def handler(name: str) -> Response:
            target = mux_pb2.Target(instance_name=name)
            return await answer(method, lambda: serve(target), DataPlaneError.tei_body)

        handler.__name__ = f"data_{method}"
        app.post(f"/instances/<name>/{method}")(handler)

    async def embed(target: mux_pb2.Target) -> Any:
        body = await _decode(EmbedBody)
        texts = _inputs(body.inputs)
        requests = [
            tei_pb2.EmbedRequest(
                inputs=text,
                truncate=bool(body.truncate),
                normalize=body.normalize,
                truncation_direction=_direction(body.truncation_direction),
                prompt_name=body.prompt_name,
                dimensions=body.dimensions,
            )
            for text in texts
        ]
        answers = await many(
            target, "tei.v1.Embed", "Embed", "EmbedStream", requests, tei_pb2.EmbedResponse
        )
        return [list(a.embeddings) for a in answers]

    async def embed_sparse(target: mux_pb2.Target) -> Any:
        body = await _decode(EmbedBody)
        texts = _inputs(body.inputs)
        requests = [
            tei_pb2.EmbedSparseRequest(
                inputs=text,
                truncate=bool(body.truncate),
                truncation_direction=_direction(body.truncation_direction),
                prompt_name=body.prompt_name,
            )
            for text in texts
        ]
        answers = await many(
            target,
            "tei.v1.Embed",
            "EmbedSparse",
            "EmbedSparseStream",
            requests,
            tei_pb2.EmbedSparseResponse,
        )
        return [
            [{"index": v.index, "value": v.value} for v in a.sparse_embeddings] for a in answers
        ]

    async def rerank(target: mux_pb2.Target) -> Any:
        body = await _decode(RerankBody)
        if not body.texts:
            raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", "`texts` cannot be empty")
        _inputs(body.texts)
        message = tei_pb2.RerankRequest(
            query=body.query,
            texts=body.texts,
            truncate=bool(body.truncate),
            raw_scores=body.raw_scores,
            return_text=body.return_text,
            truncation_direction=_direction(body.truncation_direction),
        )
        (answer,) = await many(
            target, "tei.v1.Rerank", "Rerank", "", [message], tei_pb2.RerankResponse
        )
        return [
            {"index": r.index, "text": r.text, "score": r.score}
            if r.HasField("text")
            else {"index": r.index, "score": r.score}
            for r in answer.ranks
        ]

    async def tokenize(target: mux_pb2.Target) -> Any:
        body = await _decode(TokenizeBody)
        texts = _inputs(body.inputs)
        requests = [
            tei_pb2.EncodeRequest(
                inputs=text,
                add_special_tokens=body.add_special_tokens,
                prompt_name=body.prompt_name,
            )
            for text in texts
        ]
        answers = await many(
            target, "tei.v1.Tokenize", "Tokenize", "TokenizeStream", requests,
            tei_pb2.EncodeResponse,
        )  # fmt: skip
        return [
            [
                {
                    "id": t.id,
                    "text": t.text,
                    "special": t.special,
                    "start": t.start if t.HasField("start") else None,
                    "stop": t.stop if t.HasField("stop") else None,
                }
                for t in a.tokens
            ]
            for a in answers
        ]

    tei_route("embed", embed)
    tei_route("embed_sparse", embed_sparse)
    tei_route("rerank", rerank)
    tei_route("tokenize", tokenize)

    @app.post("/v1/embeddings")
    async def openai_embeddings() -> Response:
        return await answer(
            "openai_embeddings", lambda: _openai(data, many), DataPlaneError.openai_body
        )


async def _openai(data: MultiplexerService, many: Any) -> Any:
    body = await _decode(OpenAIEmbeddingsBody)
    texts = _inputs(body.input)
    names = {r.name for r in data.instances.all()}
    target = (
        mux_pb2.Target(instance_name=body.model)
        if body.model in names
        else mux_pb2.Target(model_id=body.model)
    )
    requests = [
        tei_pb2.EmbedRequest(inputs=text, truncate=True, normalize=True, dimensions=body.dimensions)
        for text in texts
    ]
    answers = await many(
        target, "tei.v1.Embed", "Embed", "EmbedStream", requests, tei_pb2.EmbedResponse
    )
    rows = []
    tokens = 0
    for index, answer in enumerate(answers):
        vector: Any = list(answer.embeddings)
        if body.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        rows.append({"object": "embedding", "embedding": vector, "index": index})
        tokens += answer.metadata.compute_tokens
    return {
        "object": "list",
        "data": rows,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
