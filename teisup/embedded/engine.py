"""The model: sentence-transformers on PyTorch, behind a small synchronous API.

`load_engine` picks the model class from the model's own ``config.json``, as
TEI picks its backend model:

* ``--pooling splade`` (a ``*ForMaskedLM`` architecture): `SparseEncoder`;
* a ``*ForSequenceClassification`` architecture: `CrossEncoder`, a reranker
  with one label and a classifier with more;
* anything else: `SentenceTransformer` (dense embeddings).

Tokenization runs on the caller's thread (`Engine.encode`); `Engine.forward`
runs one padded batch through the model and is meant for `INFERENCE_THREAD`,
the one thread every forward pass of the process runs on.
Token ids are computed once, by the request's own tokenization, and fed to the
model as they are, so what was validated against ``max_input_length`` is
exactly what the model sees.

Unlike ``SentenceTransformer.encode``, a ``Normalize`` module in the pipeline
is skipped: as in TEI, normalizing is the request's choice (``normalize``).
"""

from __future__ import annotations

import concurrent.futures
import enum
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import trio

__all__ = [
    "INFERENCE_THREAD",
    "Encoded",
    "Engine",
    "EngineError",
    "InferenceThread",
    "ModelKind",
    "Outputs",
    "load_engine",
]

FloatArray = npt.NDArray[np.float32]
T = TypeVar("T")


class InferenceThread:
    """One long-lived thread that runs every forward pass, warm-up included.

    PyTorch's CPU build parallelizes with OpenMP (libgomp), which keeps a team
    of helper threads per thread that starts parallel work. A warm-up on the
    main thread and passes on a worker thread would make two teams, twice as
    many OpenMP threads as CPUs, contending for them (on two cores a pass was
    about 10% slower so). Running every pass on this one thread keeps one
    team. The thread starts with the first pass and lives as long as the
    process.

    libgomp's helpers spin about 300,000 times at a barrier before they sleep
    (``GOMP_SPINCOUNT``), left as it is: on an idle 2-core machine 1,000
    made 32 looping clients 16% slower and one caller 40% slower. On a busy
    machine the long spin costs far more (a waiting helper spins through the
    slices of the thread it waits for: 4x and 10x slower with the default),
    so there ``GOMP_SPINCOUNT=1000`` or ``OMP_WAIT_POLICY=PASSIVE`` in the
    server's environment pays.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="teisup-inference"
        )

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread and wait for it (blocking: not from Trio)."""
        return self._executor.submit(fn).result()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread; one at a time, in submission order.

        Not cancellable once submitted, like a forward pass: a cancelled caller
        still waits for ``fn`` to finish.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._executor.submit(fn)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()


INFERENCE_THREAD = InferenceThread()
"""The process's inference thread (see `InferenceThread`)."""


class ModelKind(enum.IntEnum):
    """TEI's model types; the values are ``tei.v1.ModelType``'s."""

    EMBEDDING = 0
    CLASSIFIER = 1
    RERANKER = 2


class EngineError(Exception):
    """A model that cannot be loaded or served as asked (start-up fails, exit 1)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input (or pair), ready for a batch."""

    ids: list[int]
    type_ids: list[int]
    chars: int
    """Characters of input, for the response metadata."""


@dataclass(slots=True)
class Outputs:
    """What one forward pass produced for a batch, row i for input i."""

    pooled: FloatArray | None = None
    """``(n, dims)``: the pooled (dense or SPLADE) embeddings."""
    tokens: list[FloatArray] = field(default_factory=list)
    """Per input ``(len_i, hidden)``: every token's embedding (dense models only)."""
    scores: FloatArray | None = None
    """``(n, labels)``: raw classifier logits."""


_POOLING_MODES = {"cls": "cls", "mean": "mean", "last-token": "lasttoken"}


class Engine:
    """A loaded model, its tokenizer and what TEI's Info reports about it."""

    def __init__(
        self,
        model: Any,
        *,
        kind: ModelKind,
        splade: bool,
        max_input_length: int,
        dtype: str,
        pooling: str | None,
        id2label: dict[int, str],
    ) -> None:
        import torch

        self.model = model
        self.kind = kind
        self.splade = splade
        self.max_input_length = max_input_length
        self.dtype = dtype
        self.pooling = pooling
        self.id2label = id2label
        # Our own tokenizers.Tokenizer, so no padding/truncation state set by
        # transformers leaks in, and ours leaks nowhere.
        from tokenizers import Tokenizer

        backend = model.tokenizer.backend_tokenizer
        self.tokenizer: Tokenizer = Tokenizer.from_str(backend.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._pad_id = int(model.tokenizer.pad_token_id or 0)
        names = getattr(model.tokenizer, "model_input_names", ["token_type_ids"])
        self._use_type_ids = "token_type_ids" in names
        # The modules a forward pass runs: the pipeline minus Normalize (TEI
        # leaves normalizing to the request).
        from sentence_transformers.sentence_transformer.modules import Normalize

        self._modules = [m for m in model if not isinstance(m, Normalize)]
        self._device = model.device
        self._torch = torch

    @property
    def dimensions(self) -> int:
        """Length of a pooled embedding (the vocabulary size for SPLADE)."""
        if self.splade:
            return int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        dim = self.model.get_embedding_dimension()
        return int(dim)

    # -- tokenization (caller's thread) -----------------------------------------

    def tokenize(
        self, text: str, pair: str | None = None, *, add_special_tokens: bool = True
    ) -> Any:
        """The raw `tokenizers.Encoding` of ``text`` (and ``pair``), untruncated."""
        return self.tokenizer.encode(text, pair, add_special_tokens=add_special_tokens)

    def encode(
        self,
        text: str,
        pair: str | None = None,
        *,
        truncate_to: int | None = None,
        left: bool = False,
    ) -> Encoded:
        """Tokenize with special tokens; truncate to ``truncate_to`` tokens if given.

        Truncation is longest-first, from the right or (``left``) the left, and
        keeps the special tokens, as TEI's.
        """
        if truncate_to is None:
            encoding = self.tokenizer.encode(text, pair)
        else:
            self.tokenizer.enable_truncation(
                truncate_to, strategy="longest_first", direction="left" if left else "right"
            )
            try:
                encoding = self.tokenizer.encode(text, pair)
            finally:
                self.tokenizer.no_truncation()
        chars = len(text) + (len(pair) if pair is not None else 0)
        return Encoded(list(encoding.ids), list(encoding.type_ids), chars)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Token ids back to text."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    # -- inference (worker thread) ----------------------------------------------

    def forward(self, batch: Sequence[Encoded], *, want_tokens: bool = False) -> Outputs:
        """Run one batch through the model (blocking: call it from a worker thread)."""
        torch = self._torch
        n = len(batch)
        width = max(len(e.ids) for e in batch)
        # Filled in numpy (one slice copy a row), handed to torch without a copy.
        input_ids = np.full((n, width), self._pad_id, dtype=np.int64)
        type_ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, item in enumerate(batch):
            length = len(item.ids)
            input_ids[row, :length] = item.ids
            type_ids[row, :length] = item.type_ids
            mask[row, :length] = 1
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(self._device),
            "attention_mask": torch.from_numpy(mask).to(self._device),
            "modality": "text",
        }
        if self._use_type_ids:
            features["token_type_ids"] = torch.from_numpy(type_ids).to(self._device)
        with torch.inference_mode():
            for module in self._modules:
                features = module(features)
        out = Outputs()
        if self.kind is ModelKind.EMBEDDING:
            out.pooled = features["sentence_embedding"].float().cpu().numpy()
            if want_tokens and not self.splade:
                tokens = features["token_embeddings"].float().cpu().numpy()
                out.tokens = [tokens[i, : len(item.ids)] for i, item in enumerate(batch)]
        else:
            out.scores = features["scores"].float().cpu().numpy().reshape(n, -1)
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"`{path.name}` not found in {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"Failed to parse `{path.name}`: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"Failed to parse `{path.name}`: not a JSON object")
    return data


def load_engine(path: Path, *, pooling: str | None = None, dtype: str | None = None) -> Engine:
    """Load the model in ``path`` (blocking, seconds); raise `EngineError` if it cannot serve.

    Runs with ``HF_HUB_OFFLINE=1``: nothing is fetched over the network.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # No progress bars: stderr is a log, and a bar is noise in it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    config = _read_json(path / "config.json")
    architectures = [str(a) for a in config.get("architectures") or []]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float16" if device == "cuda" else "float32"
    torch_dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        dtype
    ]
    kind = ModelKind.EMBEDDING
    splade = False
    id2label: dict[int, str] = {}
    try:
        if pooling == "splade":
            if not any(a.endswith("ForMaskedLM") for a in architectures):
                raise EngineError(
                    f"Splade pooling is not supported: model architecture {architectures} "
                    "is not a `*ForMaskedLM`"
                )
            from sentence_transformers import SparseEncoder

            model: Any = SparseEncoder(str(path), device=device, local_files_only=True)
            splade = True
            for module in model:
                # TEI's SPLADE activation: log(1 + relu(x)), then max over tokens.
                if hasattr(module, "activation_function"):
                    module.activation_function = "log1p_relu"
        elif any(a.endswith("ForSequenceClassification") for a in architectures):
            from sentence_transformers import CrossEncoder

            model = CrossEncoder(str(path), device=device, local_files_only=True)
            labels = config.get("id2label") or {"0": "LABEL_0"}
            id2label = {int(k): str(v) for k, v in labels.items()}
            # TEI: one label is a reranker, more is a classifier.
            kind = ModelKind.RERANKER if len(id2label) == 1 else ModelKind.CLASSIFIER
        else:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device=device, local_files_only=True)
            if pooling is not None:
                _override_pooling(model, pooling)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"Could not create backend: {type(exc).__name__}: {exc}") from exc
    model.to(torch_dtype)
    model.eval()
    max_length = model.max_seq_length or config.get("max_position_embeddings") or 512
    if pooling is None and kind is ModelKind.EMBEDDING:
        pooling = _pooling_name(model)
    return Engine(
        model,
        kind=kind,
        splade=splade,
        max_input_length=int(max_length),
        dtype=dtype,
        pooling=pooling,
        id2label=id2label,
    )


def _override_pooling(model: Any, pooling: str) -> None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    for index, module in enumerate(model):
        if isinstance(module, Pooling):
            replacement = Pooling(module.get_embedding_dimension(), _POOLING_MODES[pooling])
            model[index] = replacement.to(model.device)
            return
    raise EngineError("--pooling given, but the model has no pooling module to replace")


def _pooling_name(model: Any) -> str | None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    for module in model:
        if isinstance(module, Pooling):
            modes = {v: k for k, v in _POOLING_MODES.items()}
            return modes.get(str(module.get_config_dict().get("pooling_mode")), "mean")
    return None
