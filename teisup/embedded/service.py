"""The ``tei.v1`` services (Info, Embed, Predict, Rerank, Tokenize), health and reflection.

Semantics are TEI 1.8.3's gRPC router (``router/src/grpc/server.rs``):

* proto3 defaults: ``normalize``, ``truncate``, ``add_special_tokens`` and
  ``skip_special_tokens`` are false unless sent;
* unary Embed/EmbedSparse/EmbedAll/Predict/PredictPair take a concurrency
  permit without waiting (RESOURCE_EXHAUSTED ``Model is overloaded``); streams
  and Rerank wait for one; Tokenize/Decode need none;
* streams answer in request order, at most ``GRPC_MAX_PARALLEL_STREAM_REQUESTS``
  (default 1024) in flight per stream, and the first error ends the stream;
* TEI's error kinds map to its status codes: Empty and Validation to
  INVALID_ARGUMENT, Backend and Tokenizer to FAILED_PRECONDITION, Overloaded to
  RESOURCE_EXHAUSTED; an RPC the model cannot serve is FAILED_PRECONDITION;
* ranks and predictions are sorted by score, descending; sparse output holds
  the non-zero entries only;
* unary responses carry ``x-compute-*`` / ``x-*-time`` headers (milliseconds),
  the body's ``Metadata`` the same in nanoseconds.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import purerpc
import trio
from purerpc import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import HealthServicer, ServingStatus

from .batcher import Batcher, BatchError, Job, OpenStream
from .cli import TEI_VERSION, Settings
from .engine import Encoded, Engine, ModelKind
from .metrics import Metrics
from .server import current_call

__all__ = [
    "TEI_SERVICES",
    "TeiHealth",
    "TeiServices",
    "model_services",
]

TEI_SERVICES = ("tei.v1.Info", "tei.v1.Embed", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Tokenize")
"""Every TEI service, registered whatever the model type (as TEI does)."""

_LEFT = tei_pb2.TRUNCATION_DIRECTION_LEFT


def model_services(kind: ModelKind) -> tuple[str, ...]:
    """The services TEI marks SERVING for a model of this kind."""
    if kind is ModelKind.EMBEDDING:
        return ("tei.v1.Embed",)
    if kind is ModelKind.CLASSIFIER:
        return ("tei.v1.Predict",)
    return ("tei.v1.Predict", "tei.v1.Rerank")


class TeiHealth(HealthServicer):
    """``grpc.health.v1.Health`` with TEI's per-service statuses and messages."""

    def __init__(self) -> None:
        super().__init__(
            {
                "": ServingStatus.SERVING,
                "tei.v1.Info": ServingStatus.SERVING,
                "tei.v1.Tokenize": ServingStatus.SERVING,
                "tei.v1.Embed": ServingStatus.NOT_SERVING,
                "tei.v1.Predict": ServingStatus.NOT_SERVING,
                "tei.v1.Rerank": ServingStatus.NOT_SERVING,
            }
        )

    async def Check(
        self, input_message: health_pb2.HealthCheckRequest
    ) -> health_pb2.HealthCheckResponse:
        status = self.statuses.get(input_message.service)
        if status is None:
            raise NotFoundError("service not registered")  # tonic-health's words
        return health_pb2.HealthCheckResponse(status=status.name)


# --------------------------------------------------------------------------- errors


def _empty(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message)


def _validation(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message)


def _backend(message: str) -> FailedPreconditionError:
    return FailedPreconditionError(f"Backend error: {message}")


# --------------------------------------------------------------------------- handlers


class _Sends:
    """A handler that sends through `Call.send` (see `EmbeddedServer`)."""

    __teisup_sends__ = True

    def __init__(self, raw: Callable[[Any], Awaitable[None]]) -> None:
        self.raw = raw

    async def __call__(self, arg: Any, request: Any) -> None:  # pragma: no cover - unused
        await self.raw(arg)


_TWO_ARGS = inspect.Signature(
    [
        inspect.Parameter("arg", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
)


def _service(template: purerpc.Servicer, handlers: dict[str, _Sends]) -> purerpc.Service:
    """A purerpc Service with ``template``'s name and signatures and our handlers."""
    generated = template.service
    service = purerpc.Service(generated.name)
    for name, bound in generated.methods.items():
        service.add_method(name, handlers[name], bound.signature, method_signature=_TWO_ARGS)
    return service


@dataclass(slots=True)
class _Timing:
    chars: int = 0
    tokens: int = 0
    tokenization_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0


@dataclass(slots=True)
class _Ready:
    """One stream answer to come: set once its computation ends, in any order."""

    done: trio.Event
    response: Any = None
    error: BaseException | None = None


class TeiServices:
    """The handlers of every ``tei.v1`` RPC over one engine and batcher."""

    def __init__(
        self, engine: Engine, batcher: Batcher, settings: Settings, metrics: Metrics
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics
        self.max_parallel_stream = int(os.environ.get("GRPC_MAX_PARALLEL_STREAM_REQUESTS", "1024"))
        self._prompts: dict[str, str] = dict(getattr(engine.model, "prompts", None) or {})
        self._default_prompt = settings.default_prompt
        if settings.default_prompt_name is not None:
            if settings.default_prompt_name not in self._prompts:
                raise ValueError(
                    f"Default prompt name `{settings.default_prompt_name}` is not in the "
                    f"list of prompts (available: {sorted(self._prompts)})"
                )
            self._default_prompt = self._prompts[settings.default_prompt_name]

    def services(self) -> list[purerpc.Service]:
        """The five ``tei.v1`` services, ready for `EmbeddedServer.add_service`."""
        s = _Sends
        return [
            _service(tei_grpc.InfoServicer(), {"Info": s(self._unary(self.info))}),
            _service(
                tei_grpc.EmbedServicer(),
                {
                    "Embed": s(self._unary(self.embed)),
                    "EmbedStream": s(self._stream(self.embed_one)),
                    "EmbedSparse": s(self._unary(self.embed_sparse)),
                    "EmbedSparseStream": s(self._stream(self.embed_sparse_one)),
                    "EmbedAll": s(self._unary(self.embed_all)),
                    "EmbedAllStream": s(self._stream(self.embed_all_one)),
                },
            ),
            _service(
                tei_grpc.PredictServicer(),
                {
                    "Predict": s(self._unary(self.predict)),
                    "PredictPair": s(self._unary(self.predict_pair)),
                    "PredictStream": s(self._stream(self.predict_one)),
                    "PredictPairStream": s(self._stream(self.predict_pair_one)),
                },
            ),
            _service(
                tei_grpc.RerankServicer(),
                {"Rerank": s(self._unary(self.rerank)), "RerankStream": s(self.rerank_stream)},
            ),
            _service(
                tei_grpc.TokenizeServicer(),
                {
                    "Tokenize": s(self._unary(self.tokenize)),
                    "TokenizeStream": s(self._stream(self.tokenize_one)),
                    "Decode": s(self._unary(self.decode)),
                    "DecodeStream": s(self._stream(self.decode_one)),
                },
            ),
        ]

    # -- call shapes -------------------------------------------------------------

    @staticmethod
    def _unary(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[None]]:
        async def handle(request: Any) -> None:
            response = await fn(request)
            await current_call().send(response)

        return handle

    def _stream(
        self, one: Callable[[Any], Awaitable[Any]]
    ) -> Callable[[AsyncIterator[Any]], Awaitable[None]]:
        """A bidi handler: every request computed concurrently, answered in order."""

        async def handle(requests: AsyncIterator[Any]) -> None:
            call = current_call()
            pending_send, pending_receive = trio.open_memory_channel[_Ready](
                self.max_parallel_stream
            )

            failure: BaseException | None = None
            opened = OpenStream()

            async def compute(request: Any, slot: _Ready) -> None:
                try:
                    slot.response = await one(request)
                except purerpc.RpcFailedError as exc:
                    slot.error = exc
                finally:
                    slot.done.set()

            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    # While the client may send more, an idle batcher waits a
                    # moment for them to join the batch (Batcher.gather).
                    with self.batcher.stream_open(opened):
                        async with pending_send:
                            async for request in requests:
                                opened.on_request()
                                slot = _Ready(trio.Event())
                                try:
                                    pending_send.send_nowait(slot)
                                except trio.WouldBlock:
                                    # Waits when max_parallel answers are outstanding.
                                    await pending_send.send(slot)
                                nursery.start_soon(compute, request, slot)

                nursery.start_soon(read)
                async with pending_receive:
                    while True:
                        # Answers that are ready go out back to back, with no
                        # checkpoint in between, so purerpc's writer sends
                        # them in one write instead of one write each.
                        try:
                            slot = pending_receive.receive_nowait()
                        except trio.WouldBlock:
                            try:
                                slot = await pending_receive.receive()
                            except trio.EndOfChannel:
                                break
                        except trio.EndOfChannel:
                            break
                        if not slot.done.is_set():
                            await slot.done.wait()
                        if slot.error is not None:
                            # The first error ends the stream: drop the rest.
                            failure = slot.error
                            nursery.cancel_scope.cancel()
                            break
                        await call.send(slot.response)
                        opened.on_answer()
            if failure is not None:
                # Raised out here, not in the nursery, so it is not wrapped in a group.
                raise failure

        return handle

    # -- shared pieces -----------------------------------------------------------

    def _take_permit_now(self) -> None:
        try:
            self.batcher.permits.acquire_nowait()
        except trio.WouldBlock:
            self.metrics.inc("te_request_failure", err="overloaded")
            raise ResourceExhaustedError("Model is overloaded") from None

    def _with_prompt(self, text: str, request: Any) -> str:
        if request.HasField("prompt_name"):
            name = request.prompt_name
            if name not in self._prompts:
                self.metrics.inc("te_request_failure", err="validation")
                raise _validation(
                    f"Input validation error: Prompt name `{name}` was not found in the "
                    f"list of available prompts"
                )
            return self._prompts[name] + text
        if self._default_prompt is not None:
            return self._default_prompt + text
        return text

    def _prepare(
        self, text: str, pair: str | None, truncate: bool, direction: int, timing: _Timing
    ) -> Encoded:
        """Validate and tokenize one input (TEI's router-side validation)."""
        started = time.perf_counter_ns()
        if not text and not pair:
            self.metrics.inc("te_request_failure", err="validation")
            raise _empty("Input validation error: `inputs` cannot be empty")
        limit = self.engine.max_input_length
        char_limit = limit * 250
        chars = len(text) + (len(pair) if pair else 0)
        if chars > char_limit:
            if not truncate:
                self.metrics.inc("te_request_failure", err="validation")
                raise _validation(
                    f"Input validation error: `inputs` must have less than {char_limit} "
                    f"characters. Given: {chars}"
                )
            text = text[:char_limit]
            pair = pair[:char_limit] if pair else pair
        try:
            encoded = self.engine.encode(text, pair)
            if len(encoded.ids) > limit:
                if not truncate:
                    self.metrics.inc("te_request_failure", err="validation")
                    raise _validation(
                        f"Input validation error: `inputs` must have less than {limit} tokens. "
                        f"Given: {len(encoded.ids)}"
                    )
                encoded = self.engine.encode(text, pair, truncate_to=limit, left=direction == _LEFT)
        except purerpc.RpcFailedError:
            raise
        except Exception as exc:
            self.metrics.inc("te_request_failure", err="tokenization")
            raise FailedPreconditionError(f"Tokenizer error: {exc}") from exc
        self.metrics.observe("te_request_input_length", len(encoded.ids))
        timing.chars += chars
        timing.tokens += len(encoded.ids)
        timing.tokenization_ns += time.perf_counter_ns() - started
        return encoded

    async def _compute(
        self,
        text: str,
        pair: str | None,
        truncate: bool,
        direction: int,
        timing: _Timing,
        *,
        want_tokens: bool = False,
    ) -> Job:
        encoded = self._prepare(text, pair, truncate, direction, timing)
        try:
            job = await self.batcher.submit(encoded, want_tokens=want_tokens)
        except BatchError as exc:
            raise _backend(str(exc)) from exc
        timing.queue_ns += job.queue_ns
        timing.inference_ns += job.inference_ns
        return job

    async def _permitted(self, unary: bool, work: Callable[[], Awaitable[Any]]) -> Any:
        if unary:
            self._take_permit_now()
        else:
            try:
                self.batcher.permits.acquire_nowait()  # no checkpoint when one is free
            except trio.WouldBlock:
                await self.batcher.permits.acquire()
        try:
            return await work()
        finally:
            self.batcher.permits.release()

    def _finish(
        self, kind: str, started: int, timing: _Timing, unary: bool, *, pairs: int = 1
    ) -> Any:
        """The response Metadata; for a unary call, the response headers too."""
        total = time.perf_counter_ns() - started
        per = max(pairs, 1)
        metadata = tei_pb2.Metadata(
            compute_chars=timing.chars,
            compute_tokens=timing.tokens,
            total_time_ns=total,
            tokenization_time_ns=timing.tokenization_ns // per,
            queue_time_ns=timing.queue_ns // per,
            inference_time_ns=timing.inference_ns // per,
        )
        seconds = 1e-9
        self.metrics.observe(f"te_{kind}_duration", total * seconds)
        self.metrics.observe(
            f"te_{kind}_tokenization_duration", metadata.tokenization_time_ns * seconds
        )
        self.metrics.observe(f"te_{kind}_queue_duration", metadata.queue_time_ns * seconds)
        self.metrics.observe(f"te_{kind}_inference_duration", metadata.inference_time_ns * seconds)
        self.metrics.observe("te_request_duration", total * seconds)
        self.metrics.observe(
            "te_request_tokenization_duration", metadata.tokenization_time_ns * seconds
        )
        self.metrics.observe("te_request_queue_duration", metadata.queue_time_ns * seconds)
        self.metrics.observe("te_request_inference_duration", metadata.inference_time_ns * seconds)
        self.metrics.inc(f"te_{kind}_success")
        if unary:

            def ms(ns: int) -> str:
                return str(ns // 1_000_000)

            current_call().headers.extend(
                [
                    ("x-compute-type", "gpu+optimized"),
                    ("x-compute-time", ms(total)),
                    ("x-compute-characters", str(timing.chars)),
                    ("x-compute-tokens", str(timing.tokens)),
                    ("x-total-time", ms(total)),
                    ("x-tokenization-time", ms(metadata.tokenization_time_ns)),
                    ("x-queue-time", ms(metadata.queue_time_ns)),
                    ("x-inference-time", ms(metadata.inference_time_ns)),
                ]
            )
        return metadata

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            self.metrics.inc("te_request_failure", err="model_type")
            raise FailedPreconditionError(message)

    # -- Info ----------------------------------------------------------------------

    async def info(self, request: tei_pb2.InfoRequest) -> tei_pb2.InfoResponse:
        """``tei.v1.Info/Info``."""
        s = self.settings
        fields: dict[str, Any] = {
            "version": TEI_VERSION,
            "model_id": s.model_id,
            "model_dtype": self.engine.dtype,
            "model_type": int(self.engine.kind),
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_input_length": self.engine.max_input_length,
            "max_batch_tokens": s.max_batch_tokens,
            "max_client_batch_size": s.max_client_batch_size,
            "tokenization_workers": s.workers,
        }
        if s.revision is not None:
            fields["model_sha"] = s.revision
        if s.max_batch_requests is not None:
            fields["max_batch_requests"] = s.max_batch_requests
        return tei_pb2.InfoResponse(**fields)

    # -- Embed ---------------------------------------------------------------------

    async def _embed(self, request: tei_pb2.EmbedRequest, unary: bool) -> tei_pb2.EmbedResponse:
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="single")
        self.metrics.inc("te_embed_count")
        engine = self.engine

        async def work() -> tei_pb2.EmbedResponse:
            self._require(
                engine.kind is ModelKind.EMBEDDING, "Backend error: Model is not an embedding model"
            )
            if engine.splade and request.normalize:
                self._require(
                    False, "Backend error: `normalize` is not available for SPLADE models"
                )
            if request.HasField("dimensions"):
                dims = engine.dimensions
                if request.dimensions == 0:
                    self.metrics.inc("te_request_failure", err="validation")
                    raise _validation("Input validation error: `dimensions` should be positive")
                if request.dimensions > dims:
                    self.metrics.inc("te_request_failure", err="validation")
                    raise _validation(
                        "Input validation error: `dimensions` should be smaller than the "
                        "maximum embedding dimension."
                    )
            timing = _Timing()
            text = self._with_prompt(request.inputs, request)
            job = await self._compute(
                text, None, request.truncate, request.truncation_direction, timing
            )
            assert job.outputs is not None
            assert job.outputs.pooled is not None
            vector = job.outputs.pooled[job.row]
            if request.HasField("dimensions"):
                vector = vector[: request.dimensions]
            if request.normalize:
                norm = float(np.linalg.norm(vector))
                vector = vector / max(norm, 1e-12)
            metadata = self._finish("embed", started, timing, unary)
            return tei_pb2.EmbedResponse(embeddings=vector.tolist(), metadata=metadata)

        response: tei_pb2.EmbedResponse = await self._permitted(unary, work)
        self.metrics.inc("te_request_success", method="single")
        return response

    async def embed(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        """``tei.v1.Embed/Embed``: one pooled embedding."""
        return await self._embed(request, unary=True)

    async def embed_one(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        """One message of ``tei.v1.Embed/EmbedStream``."""
        return await self._embed(request, unary=False)

    async def _embed_sparse(
        self, request: tei_pb2.EmbedSparseRequest, unary: bool
    ) -> tei_pb2.EmbedSparseResponse:
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="single")
        self.metrics.inc("te_embed_count")

        async def work() -> tei_pb2.EmbedSparseResponse:
            self._require(
                self.engine.kind is ModelKind.EMBEDDING and self.engine.splade,
                "Backend error: Model is not an embedding model with SPLADE pooling",
            )
            timing = _Timing()
            text = self._with_prompt(request.inputs, request)
            job = await self._compute(
                text, None, request.truncate, request.truncation_direction, timing
            )
            assert job.outputs is not None
            assert job.outputs.pooled is not None
            vector = job.outputs.pooled[job.row]
            (indices,) = np.nonzero(vector)
            values = [tei_pb2.SparseValue(index=int(i), value=float(vector[i])) for i in indices]
            metadata = self._finish("embed", started, timing, unary)
            return tei_pb2.EmbedSparseResponse(sparse_embeddings=values, metadata=metadata)

        response: tei_pb2.EmbedSparseResponse = await self._permitted(unary, work)
        self.metrics.inc("te_request_success", method="single")
        return response

    async def embed_sparse(self, request: tei_pb2.EmbedSparseRequest) -> Any:
        """``tei.v1.Embed/EmbedSparse``: the non-zero SPLADE weights."""
        return await self._embed_sparse(request, unary=True)

    async def embed_sparse_one(self, request: tei_pb2.EmbedSparseRequest) -> Any:
        """One message of ``tei.v1.Embed/EmbedSparseStream``."""
        return await self._embed_sparse(request, unary=False)

    async def _embed_all(
        self, request: tei_pb2.EmbedAllRequest, unary: bool
    ) -> tei_pb2.EmbedAllResponse:
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="single")
        self.metrics.inc("te_embed_count")

        async def work() -> tei_pb2.EmbedAllResponse:
            self._require(
                self.engine.kind is ModelKind.EMBEDDING,
                "Backend error: Model is not an embedding model",
            )
            self._require(
                not self.engine.splade,
                "Backend error: `embed_all` is not available for SPLADE models",
            )
            timing = _Timing()
            text = self._with_prompt(request.inputs, request)
            job = await self._compute(
                text, None, request.truncate, request.truncation_direction, timing, want_tokens=True
            )
            assert job.outputs is not None
            rows = job.outputs.tokens[job.row]
            tokens = [tei_pb2.TokenEmbedding(embeddings=row.tolist()) for row in rows]
            metadata = self._finish("embed", started, timing, unary)
            return tei_pb2.EmbedAllResponse(token_embeddings=tokens, metadata=metadata)

        response: tei_pb2.EmbedAllResponse = await self._permitted(unary, work)
        self.metrics.inc("te_request_success", method="single")
        return response

    async def embed_all(self, request: tei_pb2.EmbedAllRequest) -> Any:
        """``tei.v1.Embed/EmbedAll``: every token's embedding."""
        return await self._embed_all(request, unary=True)

    async def embed_all_one(self, request: tei_pb2.EmbedAllRequest) -> Any:
        """One message of ``tei.v1.Embed/EmbedAllStream``."""
        return await self._embed_all(request, unary=False)

    # -- Predict -------------------------------------------------------------------

    def _scores(self, logits: Any, raw: bool) -> list[float]:
        values = np.asarray(logits, dtype=np.float64)
        if raw:
            return [float(v) for v in values]
        if len(values) == 1:
            return [1.0 / (1.0 + math.exp(-float(values[0])))]
        shifted = np.exp(values - values.max())
        return [float(v) for v in shifted / shifted.sum()]

    async def _predict(
        self, text: str, pair: str | None, request: Any, unary: bool
    ) -> tei_pb2.PredictResponse:
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="single")
        self.metrics.inc("te_predict_count")

        async def work() -> tei_pb2.PredictResponse:
            self._require(
                self.engine.kind is not ModelKind.EMBEDDING,
                "Backend error: Model is not a classifier model",
            )
            timing = _Timing()
            job = await self._compute(
                text, pair, request.truncate, request.truncation_direction, timing
            )
            assert job.outputs is not None
            assert job.outputs.scores is not None
            scores = self._scores(job.outputs.scores[job.row], request.raw_scores)
            labels = self.engine.id2label
            predictions = sorted(
                (
                    tei_pb2.Prediction(score=score, label=labels.get(i, f"LABEL_{i}"))
                    for i, score in enumerate(scores)
                ),
                key=lambda p: p.score,
                reverse=True,
            )
            metadata = self._finish("predict", started, timing, unary)
            return tei_pb2.PredictResponse(predictions=predictions, metadata=metadata)

        response: tei_pb2.PredictResponse = await self._permitted(unary, work)
        self.metrics.inc("te_request_success", method="single")
        return response

    async def predict(self, request: tei_pb2.PredictRequest) -> tei_pb2.PredictResponse:
        """``tei.v1.Predict/Predict``: scores for every label, best first."""
        return await self._predict(request.inputs, None, request, unary=True)

    async def predict_one(self, request: tei_pb2.PredictRequest) -> tei_pb2.PredictResponse:
        """One message of ``tei.v1.Predict/PredictStream``."""
        return await self._predict(request.inputs, None, request, unary=False)

    def _pair(self, request: tei_pb2.PredictPairRequest) -> tuple[str, str | None]:
        inputs = list(request.inputs)
        if len(inputs) not in (1, 2):
            self.metrics.inc("te_request_failure", err="validation")
            raise _validation(f"`inputs` must have a single or two elements. Given: {len(inputs)}")
        return inputs[0], inputs[1] if len(inputs) == 2 else None

    async def predict_pair(self, request: tei_pb2.PredictPairRequest) -> Any:
        """``tei.v1.Predict/PredictPair``: one text or one pair."""
        text, pair = self._pair(request)
        return await self._predict(text, pair, request, unary=True)

    async def predict_pair_one(self, request: tei_pb2.PredictPairRequest) -> Any:
        """One message of ``tei.v1.Predict/PredictPairStream``."""
        text, pair = self._pair(request)
        return await self._predict(text, pair, request, unary=False)

    # -- Rerank --------------------------------------------------------------------

    def _require_reranker(self) -> None:
        kind = self.engine.kind
        self._require(kind is not ModelKind.EMBEDDING, "model is not a classifier model")
        self._require(kind is ModelKind.RERANKER, "model is not a re-ranker model")

    async def _rerank(
        self,
        pairs: list[tuple[str, str]],
        *,
        truncate: bool,
        direction: int,
        raw_scores: bool,
        return_text: bool,
        unary: bool,
    ) -> tei_pb2.RerankResponse:
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="batch")
        timing = _Timing()
        scores: list[float] = [0.0] * len(pairs)

        async def one(index: int, query: str, text: str) -> None:
            self.metrics.inc("te_predict_count")

            async def work() -> None:
                job = await self._compute(query, text, truncate, direction, timing)
                assert job.outputs is not None
                assert job.outputs.scores is not None
                scores[index] = self._scores(job.outputs.scores[job.row][:1], raw_scores)[0]

            # Each pair waits for its permit, as TEI's rerank does.
            try:
                await self._permitted(False, work)
            except purerpc.RpcFailedError as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()  # one bad pair fails the call

        failures: list[purerpc.RpcFailedError] = []
        async with trio.open_nursery() as nursery:
            for index, (query, text) in enumerate(pairs):
                nursery.start_soon(one, index, query, text)
        if failures:
            raise failures[0]
        ranks = sorted(
            (
                tei_pb2.Rank(index=i, score=score, **({"text": pairs[i][1]} if return_text else {}))
                for i, score in enumerate(scores)
            ),
            key=lambda r: r.score,
            reverse=True,
        )
        metadata = self._finish("predict", started, timing, unary, pairs=len(pairs))
        self.metrics.inc("te_request_success", method="batch")
        return tei_pb2.RerankResponse(ranks=ranks, metadata=metadata)

    async def rerank(self, request: tei_pb2.RerankRequest) -> tei_pb2.RerankResponse:
        """``tei.v1.Rerank/Rerank``: the texts ranked against the query, best first."""
        self._require_reranker()
        texts = list(request.texts)
        if not texts:
            self.metrics.inc("te_request_failure", err="validation")
            raise _empty("`texts` cannot be empty")
        if len(texts) > self.settings.max_client_batch_size:
            self.metrics.inc("te_request_failure", err="batch_size")
            raise _validation(
                f"batch size {len(texts)} > maximum allowed batch size "
                f"{self.settings.max_client_batch_size}"
            )
        return await self._rerank(
            [(request.query, t) for t in texts],
            truncate=request.truncate,
            direction=request.truncation_direction,
            raw_scores=request.raw_scores,
            return_text=request.return_text,
            unary=True,
        )

    async def rerank_stream(self, requests: AsyncIterator[tei_pb2.RerankStreamRequest]) -> None:
        """``tei.v1.Rerank/RerankStream``: many pairs in, one ranking out.

        ``raw_scores`` and ``return_text`` come from the first message; there is
        no batch-size limit (as in TEI).
        """
        self._require_reranker()
        pairs: list[tuple[str, str]] = []
        first: tei_pb2.RerankStreamRequest | None = None
        async for request in requests:
            first = first or request
            pairs.append((request.query, request.text))
        if first is None:
            raise _empty("`texts` cannot be empty")
        response = await self._rerank(
            pairs,
            truncate=first.truncate,
            direction=first.truncation_direction,
            raw_scores=first.raw_scores,
            return_text=first.return_text,
            unary=True,
        )
        await current_call().send(response)

    # -- Tokenize ------------------------------------------------------------------

    async def tokenize(self, request: tei_pb2.EncodeRequest) -> tei_pb2.EncodeResponse:
        """``tei.v1.Tokenize/Tokenize``: tokens with byte offsets into the input."""
        text = self._with_prompt(request.inputs, request)
        encoding = self.engine.tokenize(text, add_special_tokens=request.add_special_tokens)
        # tokenizers reports character offsets; TEI reports byte offsets.
        byte_at = [0]
        for ch in text:
            byte_at.append(byte_at[-1] + len(ch.encode()))
        raw = text.encode()
        tokens = []
        for token_id, (start, stop), special, token in zip(
            encoding.ids,
            encoding.offsets,
            encoding.special_tokens_mask,
            encoding.tokens,
            strict=True,
        ):
            if special:
                tokens.append(tei_pb2.SimpleToken(id=token_id, text=token, special=True))
            else:
                b_start, b_stop = byte_at[start], byte_at[stop]
                tokens.append(
                    tei_pb2.SimpleToken(
                        id=token_id,
                        text=raw[b_start:b_stop].decode(errors="replace"),
                        special=False,
                        start=b_start,
                        stop=b_stop,
                    )
                )
        return tei_pb2.EncodeResponse(tokens=tokens)

    async def tokenize_one(self, request: tei_pb2.EncodeRequest) -> tei_pb2.EncodeResponse:
        """One message of ``tei.v1.Tokenize/TokenizeStream``."""
        return await self.tokenize(request)

    async def decode(self, request: tei_pb2.DecodeRequest) -> tei_pb2.DecodeResponse:
        """``tei.v1.Tokenize/Decode``: token ids back to text."""
        if not request.ids:
            raise _empty("`ids` cannot be empty")
        try:
            text = self.engine.decode(request.ids, skip_special_tokens=request.skip_special_tokens)
        except Exception as exc:
            raise FailedPreconditionError(f"Tokenizer error: {exc}") from exc
        return tei_pb2.DecodeResponse(text=text)

    async def decode_one(self, request: tei_pb2.DecodeRequest) -> tei_pb2.DecodeResponse:
        """One message of ``tei.v1.Tokenize/DecodeStream``."""
        return await self.decode(request)
