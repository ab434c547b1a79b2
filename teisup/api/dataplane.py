"""The data plane over HTTP, for clients without gRPC.

Routes on the REST port, all through the multiplexer's routing, backend pool,
in-flight caps and deadlines (`teisup.grpc.MultiplexerService`):

* ``POST /instances/<name>/embed``, ``/embed_all``, ``/embed_sparse``,
  ``/predict``, ``/rerank``, ``/similarity``, ``/tokenize``, ``/decode`` and
  ``GET /instances/<name>/info``: TEI 1.9.3's HTTP JSON request and response
  shapes, forwarded to the instance's ``tei.v1`` service; a batch of inputs
  goes over one stream and comes back in order. ``/similarity`` is computed
  here from the instance's normalized embeddings (cosine similarity, as
  TEI's), ``/info`` from its ``Info`` answer;
* ``POST /v1/embeddings`` (also ``/embeddings``): OpenAI's embeddings API;
  ``model`` is an instance name, or else a model id (spread over its ready
  replicas as gRPC ``model_id`` routing is). Inputs are always normalised and
  truncated to the model's length (OpenAI clients do not cut texts to a local
  model's limit). ``GET /v1/models`` lists what ``model`` accepts: every
  instance name and model id, in OpenAI's list shape.

TEI's routes answer errors as ``{"error", "error_type", "code", "timestamp"}``
(TEI's two fields and teisup's); ``/v1/embeddings`` answers OpenAI's
``{"error": {"message", "type", "code"}}``. The status follows the backend's
gRPC code: INVALID_ARGUMENT 422, NOT_FOUND 404, UNAVAILABLE 503,
RESOURCE_EXHAUSTED 429, DEADLINE_EXCEEDED 504, FAILED_PRECONDITION /
UNIMPLEMENTED / INTERNAL 424, anything else 502.
"""

from __future__ import annotations

import base64
import datetime
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


class EmbedAllBody(msgspec.Struct):
    """TEI's ``/embed_all`` body."""

    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None


class PredictBody(msgspec.Struct):
    """TEI's ``/predict`` body: a text, a pair ``[a, b]``, or a batch of texts and pairs."""

    inputs: str | list[str | list[str]]
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    raw_scores: bool = False


class SimilarityInputs(msgspec.Struct):
    """``/similarity``'s texts: one source, compared with each sentence."""

    source_sentence: str
    sentences: list[str]


class SimilarityParameters(msgspec.Struct):
    """``/similarity``'s options."""

    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None


class SimilarityBody(msgspec.Struct):
    """TEI's ``/similarity`` body."""

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class DecodeBody(msgspec.Struct):
    """TEI's ``/decode`` body: ``ids`` is one list of token ids, or a list of them."""

    ids: list[TokenId | list[TokenId]]
    skip_special_tokens: bool = True


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


def _inputs(value: str | list[str], field: str = "inputs") -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", f"`{field}` cannot be empty")
    _check_batch_size(len(texts))
    return texts


def _check_batch_size(count: int) -> None:
    if count > MAX_BATCH:
        raise DataPlaneError(
            422,
            "Validation",
            "INVALID_ARGUMENT",
            f"batch size {count} > maximum allowed batch size {MAX_BATCH}",
        )


async def _decode(kind: type[B], *, texts_only: bool = True) -> B:
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
    for key in ("inputs", "input") if texts_only else ():
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

    def truncating(truncate: bool | None, target: mux_pb2.Target) -> bool:
        """A request's ``truncate``; unset (null), the instance's ``auto_truncate``, as TEI's."""
        if truncate is not None:
            return truncate
        for record in data.instances.all():
            if record.name == target.instance_name:
                return bool(getattr(record.spec, "auto_truncate", False))
        return False  # no such instance: routing answers 404

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

    def truncation(options: Any, target: mux_pb2.Target) -> dict[str, Any]:
        """The ``truncate`` and ``truncation_direction`` fields of a request's ``options``."""
        return {
            "truncate": truncating(options.truncate, target),
            "truncation_direction": _direction(options.truncation_direction),
        }

    async def per_text(
        target: mux_pb2.Target, service: str, method: str, texts: list[Any],
        request_type: Any, response_type: Any, **fields: Any,
    ) -> list[Any]:  # fmt: skip
        """One ``request_type(inputs=text, **fields)`` per text, through `many`
        (``method``, or its ``<method>Stream`` for a batch)."""
        requests = [request_type(inputs=text, **fields) for text in texts]
        return await many(target, service, method, f"{method}Stream", requests, response_type)

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

    def tei_route(
        method: str, serve: Callable[[mux_pb2.Target], Awaitable[Any]], *, verb: str = "POST"
    ) -> None:
        async def handler(name: str) -> Response:
            target = mux_pb2.Target(instance_name=name)
            return await answer(method, lambda: serve(target), DataPlaneError.tei_body)

        handler.__name__ = f"data_{method}"
        app.route(f"/instances/<name>/{method}", methods=[verb])(handler)

    async def embed(target: mux_pb2.Target) -> Any:
        body = await _decode(EmbedBody)
        answers = await per_text(
            target, "tei.v1.Embed", "Embed", _inputs(body.inputs),
            tei_pb2.EmbedRequest, tei_pb2.EmbedResponse,
            normalize=body.normalize, prompt_name=body.prompt_name, dimensions=body.dimensions,
            **truncation(body, target),
        )  # fmt: skip
        return [list(a.embeddings) for a in answers]

    async def embed_sparse(target: mux_pb2.Target) -> Any:
        body = await _decode(EmbedBody)
        answers = await per_text(
            target, "tei.v1.Embed", "EmbedSparse", _inputs(body.inputs),
            tei_pb2.EmbedSparseRequest, tei_pb2.EmbedSparseResponse,
            prompt_name=body.prompt_name, **truncation(body, target),
        )  # fmt: skip
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
            raw_scores=body.raw_scores,
            return_text=body.return_text,
            **truncation(body, target),
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
        answers = await per_text(
            target, "tei.v1.Tokenize", "Tokenize", _inputs(body.inputs),
            tei_pb2.EncodeRequest, tei_pb2.EncodeResponse,
            add_special_tokens=body.add_special_tokens, prompt_name=body.prompt_name,
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

    async def embed_all(target: mux_pb2.Target) -> Any:
        body = await _decode(EmbedAllBody)
        answers = await per_text(
            target, "tei.v1.Embed", "EmbedAll", _inputs(body.inputs),
            tei_pb2.EmbedAllRequest, tei_pb2.EmbedAllResponse,
            prompt_name=body.prompt_name, **truncation(body, target),
        )  # fmt: skip
        return [[list(t.embeddings) for t in a.token_embeddings] for a in answers]

    async def predict(target: mux_pb2.Target) -> Any:
        body = await _decode(PredictBody, texts_only=False)
        options = {"raw_scores": body.raw_scores, **truncation(body, target)}
        single = _predict_single(body.inputs)
        if single is not None:
            request = tei_pb2.PredictPairRequest(inputs=single, **options)
            (one,) = await many(
                target, "tei.v1.Predict", "PredictPair", "", [request], tei_pb2.PredictResponse
            )
            return _predictions(one)
        answers = await per_text(
            target, "tei.v1.Predict", "PredictPair", _predict_batch(body.inputs),
            tei_pb2.PredictPairRequest, tei_pb2.PredictResponse, **options,
        )  # fmt: skip
        return [_predictions(a) for a in answers]

    async def similarity(target: mux_pb2.Target) -> Any:
        body = await _decode(SimilarityBody)
        if not body.inputs.sentences:
            raise DataPlaneError(
                400, "Empty", "INVALID_ARGUMENT", "`inputs.sentences` cannot be empty"
            )
        texts = _inputs([body.inputs.source_sentence, *body.inputs.sentences])
        parameters = body.parameters or SimilarityParameters()
        answers = await per_text(
            target, "tei.v1.Embed", "Embed", texts, tei_pb2.EmbedRequest, tei_pb2.EmbedResponse,
            normalize=True, prompt_name=parameters.prompt_name, **truncation(parameters, target),
        )  # fmt: skip
        source, *others = (list(a.embeddings) for a in answers)
        return [_cosine(source, other) for other in others]

    async def decode(target: mux_pb2.Target) -> Any:
        body = await _decode(DecodeBody)
        batch = _decode_batch(body.ids)
        requests = [
            tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=body.skip_special_tokens)
            for ids in batch
        ]
        answers = await many(
            target, "tei.v1.Tokenize", "Decode", "DecodeStream", requests,
            tei_pb2.DecodeResponse,
        )  # fmt: skip
        return [a.text for a in answers]

    async def info(target: mux_pb2.Target) -> Any:
        record = data.route(target)
        answer = await data.forward(
            target, "tei.v1.Info", "Info", tei_pb2.InfoRequest(), tei_pb2.InfoResponse,
            routed=record,
        )  # fmt: skip
        return _info(answer, record)

    tei_route("embed", embed)
    tei_route("embed_all", embed_all)
    tei_route("embed_sparse", embed_sparse)
    tei_route("predict", predict)
    tei_route("rerank", rerank)
    tei_route("similarity", similarity)
    tei_route("tokenize", tokenize)
    tei_route("decode", decode)
    tei_route("info", info, verb="GET")

    async def openai_embeddings() -> Response:
        return await answer(
            "openai_embeddings", lambda: _openai(data, many), DataPlaneError.openai_body
        )

    app.post("/v1/embeddings")(openai_embeddings)
    # TEI serves OpenAI's route at both paths.
    app.post("/embeddings", endpoint="openai_embeddings_alias")(openai_embeddings)

    @app.get("/v1/models")
    async def openai_models() -> Response:
        async def listing() -> Any:
            return _models(data.instances.all())

        return await answer("openai_models", listing, DataPlaneError.openai_body)


def _refuse(message: str) -> DataPlaneError:
    return DataPlaneError(422, "Validation", "INVALID_ARGUMENT", message)


def _predict_single(inputs: str | list[str | list[str]]) -> list[str] | None:
    """The one text or pair ``inputs`` is (TEI: ``"a"`` or ``["a", "b"]``), else None."""
    if isinstance(inputs, str):
        return [inputs]
    if len(inputs) == 2 and all(isinstance(i, str) for i in inputs):
        return [str(i) for i in inputs]
    return None


def _predict_batch(inputs: str | list[str | list[str]]) -> list[list[str]]:
    """A batch of texts and pairs: each item a text, ``[text]`` or ``[a, b]``."""
    assert not isinstance(inputs, str)
    if not inputs:
        raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", "`inputs` cannot be empty")
    if all(isinstance(i, str) for i in inputs) and len(inputs) > 2:
        raise _refuse(
            "`inputs` must be a text, a pair of texts [a, b], or a list of texts and "
            f"pairs ([[a], [a, b], ...]); got a list of {len(inputs)} texts"
        )
    batch = [[item] if isinstance(item, str) else item for item in inputs]
    for index, item in enumerate(batch):
        if len(item) not in (1, 2):
            raise _refuse(
                f"`inputs[{index}]` must have a single or two elements. Given: {len(item)}"
            )
    _check_batch_size(len(batch))
    return batch


def _predictions(answer: Any) -> list[dict[str, Any]]:
    return [{"score": p.score, "label": p.label} for p in answer.predictions]


def _cosine(a: list[float], b: list[float]) -> float:
    # Both are unit vectors (normalize=True), so the dot product is the cosine.
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


def _decode_batch(ids: list[int | list[int]]) -> list[list[int]]:
    """``ids`` as a batch: one list of token ids, or a list of such lists."""
    if not ids:
        raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", "`ids` cannot be empty")
    if all(isinstance(i, int) for i in ids):
        return [[int(i) for i in ids]]  # type: ignore[arg-type]
    if not all(isinstance(i, list) for i in ids):
        raise _refuse("`ids` must be a list of token ids or a list of lists of them, not both")
    batch: list[list[int]] = [i for i in ids if isinstance(i, list)]
    if any(not i for i in batch):
        raise DataPlaneError(400, "Empty", "INVALID_ARGUMENT", "`ids` cannot be empty")
    _check_batch_size(len(batch))
    return batch


_MODEL_TYPES = {
    tei_pb2.MODEL_TYPE_EMBEDDING: "embedding",
    tei_pb2.MODEL_TYPE_CLASSIFIER: "classifier",
    tei_pb2.MODEL_TYPE_RERANKER: "reranker",
}


def _info(answer: Any, record: Any) -> dict[str, Any]:
    """TEI's ``/info`` JSON from the instance's ``tei.v1.Info`` answer.

    gRPC's ``Info`` carries the model type but not its pooling or labels: the
    pooling is the instance's ``pooling`` setting when it has one (else null),
    the label maps are empty. ``auto_truncate`` is the instance's setting.
    """
    spec = getattr(record, "spec", None)
    kind = _MODEL_TYPES.get(answer.model_type, "embedding")
    if kind == "embedding":
        pooling = getattr(spec, "pooling", None)
        model_type: dict[str, Any] = {
            "embedding": {"pooling": pooling.replace("-", "_") if pooling else None}
        }
    else:
        model_type = {kind: {"id2label": {}, "label2id": {}}}

    def optional(field: str) -> Any:
        return getattr(answer, field) if answer.HasField(field) else None

    return {
        "model_id": answer.model_id,
        "model_sha": optional("model_sha"),
        "model_dtype": answer.model_dtype,
        "model_type": model_type,
        "max_concurrent_requests": answer.max_concurrent_requests,
        "max_input_length": answer.max_input_length,
        "max_batch_tokens": answer.max_batch_tokens,
        "max_batch_requests": optional("max_batch_requests"),
        "max_client_batch_size": answer.max_client_batch_size,
        "auto_truncate": bool(getattr(spec, "auto_truncate", False)),
        "tokenization_workers": answer.tokenization_workers,
        "version": answer.version,
        "sha": optional("sha"),
        "docker_label": optional("docker_label"),
    }


def _created(record: Any) -> int:
    stamp = getattr(record, "created_at", None)
    try:
        return int(datetime.datetime.fromisoformat(stamp).timestamp()) if stamp else 0
    except ValueError:
        return 0


def _models(records: Any) -> dict[str, Any]:
    """OpenAI's model list: every instance name, then every model id not already listed."""
    rows: dict[str, dict[str, Any]] = {}
    for record in records:
        rows[record.name] = {
            "id": record.name,
            "object": "model",
            "created": _created(record),
            "owned_by": "teisup",
        }
    for record in records:
        rows.setdefault(
            record.model_id,
            {
                "id": record.model_id,
                "object": "model",
                "created": _created(record),
                "owned_by": "teisup",
            },
        )
    return {"object": "list", "data": list(rows.values())}


async def _openai(data: MultiplexerService, many: Any) -> Any:
    body = await _decode(OpenAIEmbeddingsBody)
    texts = _inputs(body.input, "input")  # OpenAI's field is `input`
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
