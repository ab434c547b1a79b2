"""Pure TEI request validation: each check raises a `TeiError` carrying TEI's error kind.

The kinds are TEI 1.8.3's (``router/src/grpc/server.rs``), each with the
gRPC status it answers with and the ``err`` label of ``te_request_failure``
it counts under. Nothing here does I/O or counts anything: the call shapes in
`teisup.embedded.service` count a failure once, where it is turned into a
status.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from teisup.rpc import StatusCode

from .engine import ModelKind

__all__ = [
    "ErrorKind",
    "TeiError",
    "check_dimensions",
    "check_ids",
    "check_classifier",
    "check_embed",
    "check_embed_all",
    "check_embed_sparse",
    "check_input",
    "check_pair",
    "check_reranker",
    "check_rerank_texts",
    "check_tokens",
    "prompt_prefix",
]


class ErrorKind(enum.Enum):
    """TEI's error kinds: the status each answers with and its failure-metric label."""

    EMPTY = (StatusCode.INVALID_ARGUMENT, "validation")
    VALIDATION = (StatusCode.INVALID_ARGUMENT, "validation")
    BATCH_SIZE = (StatusCode.INVALID_ARGUMENT, "batch_size")
    TOKENIZER = (StatusCode.FAILED_PRECONDITION, "tokenization")
    MODEL_TYPE = (StatusCode.FAILED_PRECONDITION, "model_type")
    OVERLOADED = (StatusCode.RESOURCE_EXHAUSTED, "overloaded")
    BACKEND = (StatusCode.FAILED_PRECONDITION, None)

    @property
    def code(self) -> StatusCode:
        """The gRPC status this kind answers with."""
        code: StatusCode = self.value[0]
        return code

    @property
    def metric(self) -> str | None:
        """The ``err`` label it counts under (None: not counted as a request failure)."""
        label: str | None = self.value[1]
        return label


class TeiError(Exception):
    """A refused or failed request: its `ErrorKind` and TEI's message.

    ``counted`` False: TEI does not count it in ``te_request_failure``.
    """

    def __init__(self, kind: ErrorKind, message: str, *, counted: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.counted = counted and kind.metric is not None


def prompt_prefix(prompts: Mapping[str, str], name: str | None, default: str | None) -> str:
    """What goes before the input: the named prompt, else the default one, else nothing."""
    if name is not None:
        if name not in prompts:
            raise TeiError(
                ErrorKind.VALIDATION,
                f"Input validation error: Prompt name `{name}` was not found in the "
                f"list of available prompts",
            )
        return prompts[name]
    return default or ""


def check_input(
    text: str, pair: str | None, max_input_length: int, truncate: bool
) -> tuple[str, str | None, int]:
    """``(text, pair, characters)`` once checked: not empty, not too long in characters.

    Past the character limit (250 per token) a ``truncate`` request is cut to
    it; otherwise it is refused.
    """
    if not text and not pair:
        raise TeiError(ErrorKind.EMPTY, "Input validation error: `inputs` cannot be empty")
    char_limit = max_input_length * 250
    chars = len(text) + (len(pair) if pair else 0)
    if chars > char_limit:
        if not truncate:
            raise TeiError(
                ErrorKind.VALIDATION,
                f"Input validation error: `inputs` must have less than {char_limit} "
                f"characters. Given: {chars}",
            )
        text = text[:char_limit]
        pair = pair[:char_limit] if pair else pair
    return text, pair, chars


def check_tokens(tokens: int, max_input_length: int, truncate: bool) -> bool:
    """Whether an input of ``tokens`` must be truncated; refused if over and not ``truncate``."""
    if tokens <= max_input_length:
        return False
    if not truncate:
        raise TeiError(
            ErrorKind.VALIDATION,
            f"Input validation error: `inputs` must have less than {max_input_length} "
            f"tokens. Given: {tokens}",
        )
    return True


def check_dimensions(dimensions: int, maximum: int) -> None:
    """A requested embedding size must be in 1..``maximum``."""
    if dimensions == 0:
        raise TeiError(
            ErrorKind.VALIDATION, "Input validation error: `dimensions` should be positive"
        )
    if dimensions > maximum:
        raise TeiError(
            ErrorKind.VALIDATION,
            "Input validation error: `dimensions` should be smaller than the "
            "maximum embedding dimension.",
        )


def check_pair(inputs: Sequence[str]) -> tuple[str, str | None]:
    """PredictPair's inputs: one text, or a pair."""
    if len(inputs) not in (1, 2):
        raise TeiError(
            ErrorKind.VALIDATION,
            f"`inputs` must have a single or two elements. Given: {len(inputs)}",
        )
    return inputs[0], inputs[1] if len(inputs) == 2 else None


def check_rerank_texts(texts: Sequence[str], max_client_batch_size: int) -> None:
    """Rerank's texts: at least one, at most the client batch size."""
    if not texts:
        raise TeiError(ErrorKind.EMPTY, "`texts` cannot be empty")
    if len(texts) > max_client_batch_size:
        raise TeiError(
            ErrorKind.BATCH_SIZE,
            f"batch size {len(texts)} > maximum allowed batch size {max_client_batch_size}",
        )


def check_ids(ids: Sequence[int]) -> None:
    """Decode's token ids: at least one (not counted as a failure, as in TEI)."""
    if not ids:
        raise TeiError(ErrorKind.EMPTY, "`ids` cannot be empty", counted=False)


def check_embed(kind: ModelKind, splade: bool, normalize: bool) -> None:
    """Embed needs an embedding model; SPLADE ones cannot normalize."""
    _model(kind is ModelKind.EMBEDDING, "Backend error: Model is not an embedding model")
    _model(
        not (splade and normalize),
        "Backend error: `normalize` is not available for SPLADE models",
    )


def check_embed_sparse(kind: ModelKind, splade: bool) -> None:
    """EmbedSparse needs an embedding model with SPLADE pooling."""
    _model(
        kind is ModelKind.EMBEDDING and splade,
        "Backend error: Model is not an embedding model with SPLADE pooling",
    )


def check_embed_all(kind: ModelKind, splade: bool) -> None:
    """EmbedAll needs an embedding model without SPLADE pooling."""
    _model(kind is ModelKind.EMBEDDING, "Backend error: Model is not an embedding model")
    _model(not splade, "Backend error: `embed_all` is not available for SPLADE models")


def check_classifier(kind: ModelKind) -> None:
    """Predict needs a classifier (or re-ranker) model."""
    _model(kind is not ModelKind.EMBEDDING, "Backend error: Model is not a classifier model")


def check_reranker(kind: ModelKind) -> None:
    """Rerank needs a re-ranker model."""
    _model(kind is not ModelKind.EMBEDDING, "model is not a classifier model")
    _model(kind is ModelKind.RERANKER, "model is not a re-ranker model")


def _model(ok: bool, message: str) -> None:
    if not ok:
        raise TeiError(ErrorKind.MODEL_TYPE, message)
