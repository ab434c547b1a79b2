"""The ``tei.v1`` services (Info, Embed, Predict, Rerank, Tokenize), health and reflection.

Semantics are TEI 1.9.3's gRPC router (``router/src/grpc/server.rs``):

* ``normalize`` has presence (``optional``): unset means true, as in TEI 1.9;
  an explicit false is honoured. The other proto3 bools, ``truncate``,
  ``add_special_tokens`` and ``skip_special_tokens``, are false unless sent;
* over capacity, a call is refused at once, never queued (TEI 1.9's fail
  fast, #726): every input takes one of the ``--max-concurrent-requests``
  permits without waiting, or the call fails with RESOURCE_EXHAUSTED ``Model
  is overloaded``. The one wait left is a call's wait on *itself*: a stream
  (or a Rerank of many texts) that already holds permits may wait for its own
  to come back, so a stream longer than the permits is throttled, not failed,
  while a call that would queue behind other calls' permits is refused.
  Tokenize/Decode need no permit;
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

import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.tei.v1 import tei_pb2
from teisup.rpc import (
    Handler,
    HealthServicer,
    Method,
    RpcStatusError,
    Service,
    ServingStatus,
    StatusCode,
    current_call,
)

from . import validation
from .batcher import Batcher, BatchError, Job
from .calls import CallShapes, PermitShare, current_share
from .cli import INFO_VERSION, Settings
from .engine import Encoded, Engine, ModelKind
from .metrics import Metrics
from .validation import ErrorKind, TeiError

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
            # tonic-health's words
            raise RpcStatusError(StatusCode.NOT_FOUND, "service not registered")
        return health_pb2.HealthCheckResponse(status=status.name)


@dataclass(slots=True)
class _Timing:
    chars: int = 0
    tokens: int = 0
    tokenization_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0


# Each RPC that TEI serves both ways: (service, unary method, stream method,
# the TeiServices method that answers one request of either).
_PAIRS = (
    ("tei.v1.Embed", "Embed", "EmbedStream", "embed"),
    ("tei.v1.Embed", "EmbedSparse", "EmbedSparseStream", "embed_sparse"),
    ("tei.v1.Embed", "EmbedAll", "EmbedAllStream", "embed_all"),
    ("tei.v1.Predict", "Predict", "PredictStream", "predict"),
    ("tei.v1.Predict", "PredictPair", "PredictPairStream", "predict_pair"),
    ("tei.v1.Tokenize", "Tokenize", "TokenizeStream", "tokenize"),
    ("tei.v1.Tokenize", "Decode", "DecodeStream", "decode"),
)


def _method(service: str, name: str, handler: Handler) -> Method:
    """``name`` of ``service`` with its message types from the ``tei.v1`` descriptors."""
    descriptor = tei_pb2.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
    rpc = descriptor.methods_by_name[name]
    request = getattr(tei_pb2, rpc.input_type.name)
    response = getattr(tei_pb2, rpc.output_type.name)
    return Method(request, response, handler)


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
        self.shapes = CallShapes(batcher, metrics, max_parallel_stream=self.max_parallel_stream)
        self._prompts: dict[str, str] = dict(getattr(engine.model, "prompts", None) or {})
        self._default_prompt = settings.default_prompt
        if settings.default_prompt_name is not None:
            if settings.default_prompt_name not in self._prompts:
                raise ValueError(
                    f"Default prompt name `{settings.default_prompt_name}` is not in the "
                    f"list of prompts (available: {sorted(self._prompts)})"
                )
            self._default_prompt = self._prompts[settings.default_prompt_name]

    def services(self) -> list[Service]:
        """The five ``tei.v1`` services, ready for `teisup.rpc.Server.add_service`."""
        shapes = self.shapes
        methods: dict[str, dict[str, Method]] = {}

        def add(service: str, name: str, handler: Handler) -> None:
            methods.setdefault(service, {})[name] = _method(service, name, handler)

        add("tei.v1.Info", "Info", shapes.unary(self.info))
        for service, unary, stream, implementation in _PAIRS:
            one = getattr(self, implementation)
            add(service, unary, shapes.unary(one))
            add(service, stream, shapes.ordered_stream(one))
        add("tei.v1.Rerank", "Rerank", shapes.unary(self.rerank))
        add("tei.v1.Rerank", "RerankStream", shapes.collected(self.rerank_stream))
        return [Service(name, table) for name, table in methods.items()]

    # -- shared pieces -----------------------------------------------------------

    def _take_permit_now(self) -> None:
        try:
            self.batcher.permits.acquire_nowait()
        except trio.WouldBlock:
            raise TeiError(ErrorKind.OVERLOADED, "Model is overloaded") from None

    async def _take_permit(self, share: PermitShare) -> None:
        """A permit for one input of a many-input call; waits only on the call's own."""
        try:
            self.batcher.permits.acquire_nowait()  # no checkpoint when one is free
        except trio.WouldBlock:
            if share.held == 0:
                # Every permit is another call's: over capacity, refused at once.
                raise TeiError(ErrorKind.OVERLOADED, "Model is overloaded") from None
            # This call holds some: they come back as its own inputs finish.
            await self.batcher.permits.acquire()
        share.held += 1

    def _with_prompt(self, text: str, request: Any) -> str:
        name = request.prompt_name if request.HasField("prompt_name") else None
        return validation.prompt_prefix(self._prompts, name, self._default_prompt) + text

    def _prepare(
        self, text: str, pair: str | None, truncate: bool, direction: int, timing: _Timing
    ) -> Encoded:
        """Validate and tokenize one input (TEI's router-side validation)."""
        started = time.perf_counter_ns()
        limit = self.engine.max_input_length
        text, pair, chars = validation.check_input(text, pair, limit, truncate)
        try:
            encoded = self.engine.encode(text, pair)
            if validation.check_tokens(len(encoded.ids), limit, truncate):
                encoded = self.engine.encode(text, pair, truncate_to=limit, left=direction == _LEFT)
        except TeiError:
            raise
        except Exception as exc:
            raise TeiError(ErrorKind.TOKENIZER, f"Tokenizer error: {exc}") from exc
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
            raise TeiError(ErrorKind.BACKEND, f"Backend error: {exc}") from exc
        timing.queue_ns += job.queue_ns
        timing.inference_ns += job.inference_ns
        return job

    async def _single(
        self, counter: str, unary: bool, work: Callable[[int], Awaitable[Any]]
    ) -> Any:
        """One single-input request: counted, timed from now, run under a permit."""
        started = time.perf_counter_ns()
        self.metrics.inc("te_request_count", method="single")
        self.metrics.inc(counter)
        response = await self._permitted(unary, lambda: work(started))
        self.metrics.inc("te_request_success", method="single")
        return response

    async def _permitted(
        self, unary: bool, work: Callable[[], Awaitable[Any]], share: PermitShare | None = None
    ) -> Any:
        """``work()`` under a permit: a unary call's taken now, a stream input's as its call's."""
        if share is None:
            share = current_share() if not unary else None
        if share is None:
            self._take_permit_now()
        else:
            await self._take_permit(share)
        try:
            return await work()
        finally:
            self.batcher.permits.release()
            if share is not None:
                share.held -= 1

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

    # -- Info ----------------------------------------------------------------------

    async def info(self, request: tei_pb2.InfoRequest, unary: bool = True) -> tei_pb2.InfoResponse:
        """``tei.v1.Info/Info``."""
        s = self.settings
        fields: dict[str, Any] = {
            "version": INFO_VERSION,
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

    async def embed(self, request: tei_pb2.EmbedRequest, unary: bool) -> tei_pb2.EmbedResponse:
        """``tei.v1.Embed/Embed`` (and one message of EmbedStream): one pooled embedding."""
        engine = self.engine
        normalize = request.normalize if request.HasField("normalize") else True

        async def work(started: int) -> tei_pb2.EmbedResponse:
            validation.check_embed(engine.kind, engine.splade, normalize)
            if request.HasField("dimensions"):
                validation.check_dimensions(request.dimensions, engine.dimensions)
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
            if normalize:
                norm = float(np.linalg.norm(vector))
                vector = vector / max(norm, 1e-12)
            metadata = self._finish("embed", started, timing, unary)
            return tei_pb2.EmbedResponse(embeddings=vector.tolist(), metadata=metadata)

        response: tei_pb2.EmbedResponse = await self._single("te_embed_count", unary, work)
        return response

    async def embed_sparse(
        self, request: tei_pb2.EmbedSparseRequest, unary: bool
    ) -> tei_pb2.EmbedSparseResponse:
        """``tei.v1.Embed/EmbedSparse`` (and EmbedSparseStream): the non-zero SPLADE weights."""

        async def work(started: int) -> tei_pb2.EmbedSparseResponse:
            validation.check_embed_sparse(self.engine.kind, self.engine.splade)
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

        response: tei_pb2.EmbedSparseResponse = await self._single("te_embed_count", unary, work)
        return response

    async def embed_all(
        self, request: tei_pb2.EmbedAllRequest, unary: bool
    ) -> tei_pb2.EmbedAllResponse:
        """``tei.v1.Embed/EmbedAll`` (and EmbedAllStream): every token's embedding."""

        async def work(started: int) -> tei_pb2.EmbedAllResponse:
            validation.check_embed_all(self.engine.kind, self.engine.splade)
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

        response: tei_pb2.EmbedAllResponse = await self._single("te_embed_count", unary, work)
        return response

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

        async def work(started: int) -> tei_pb2.PredictResponse:
            validation.check_classifier(self.engine.kind)
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

        response: tei_pb2.PredictResponse = await self._single("te_predict_count", unary, work)
        return response

    async def predict(
        self, request: tei_pb2.PredictRequest, unary: bool
    ) -> tei_pb2.PredictResponse:
        """``tei.v1.Predict/Predict`` (and PredictStream): scores for every label, best first."""
        return await self._predict(request.inputs, None, request, unary)

    async def predict_pair(
        self, request: tei_pb2.PredictPairRequest, unary: bool
    ) -> tei_pb2.PredictResponse:
        """``tei.v1.Predict/PredictPair`` (and PredictPairStream): one text or one pair."""
        text, pair = validation.check_pair(list(request.inputs))
        return await self._predict(text, pair, request, unary)

    # -- Rerank --------------------------------------------------------------------

    async def _rerank(
        self,
        pairs: list[tuple[str, str]],
        *,
        truncate: bool,
        direction: int,
        raw_scores: bool,
        return_text: bool,
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

            # One permit per pair; past the free ones, refused (or waiting on this call's own).
            try:
                await self._permitted(False, work, share)
            except TeiError as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()  # one bad pair fails the call

        failures: list[TeiError] = []
        share = PermitShare()
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
        metadata = self._finish("predict", started, timing, True, pairs=len(pairs))
        self.metrics.inc("te_request_success", method="batch")
        return tei_pb2.RerankResponse(ranks=ranks, metadata=metadata)

    async def rerank(self, request: tei_pb2.RerankRequest, unary: bool) -> tei_pb2.RerankResponse:
        """``tei.v1.Rerank/Rerank``: the texts ranked against the query, best first."""
        validation.check_reranker(self.engine.kind)
        texts = list(request.texts)
        validation.check_rerank_texts(texts, self.settings.max_client_batch_size)
        return await self._rerank(
            [(request.query, t) for t in texts],
            truncate=request.truncate,
            direction=request.truncation_direction,
            raw_scores=request.raw_scores,
            return_text=request.return_text,
        )

    async def rerank_stream(
        self, requests: list[tei_pb2.RerankStreamRequest]
    ) -> tei_pb2.RerankResponse:
        """``tei.v1.Rerank/RerankStream``: many pairs in, one ranking out.

        ``raw_scores`` and ``return_text`` come from the first message; there is
        no batch-size limit (as in TEI).
        """
        validation.check_reranker(self.engine.kind)
        if not requests:
            raise TeiError(ErrorKind.EMPTY, "`texts` cannot be empty", counted=False)
        first = requests[0]
        return await self._rerank(
            [(request.query, request.text) for request in requests],
            truncate=first.truncate,
            direction=first.truncation_direction,
            raw_scores=first.raw_scores,
            return_text=first.return_text,
        )

    # -- Tokenize ------------------------------------------------------------------

    async def tokenize(self, request: tei_pb2.EncodeRequest, unary: bool) -> tei_pb2.EncodeResponse:
        """``tei.v1.Tokenize/Tokenize`` (and TokenizeStream): tokens with byte offsets."""
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

    async def decode(self, request: tei_pb2.DecodeRequest, unary: bool) -> tei_pb2.DecodeResponse:
        """``tei.v1.Tokenize/Decode`` (and DecodeStream): token ids back to text."""
        validation.check_ids(request.ids)
        try:
            text = self.engine.decode(request.ids, skip_special_tokens=request.skip_special_tokens)
        except Exception as exc:
            raise TeiError(ErrorKind.TOKENIZER, f"Tokenizer error: {exc}", counted=False) from exc
        return tei_pb2.DecodeResponse(text=text)
