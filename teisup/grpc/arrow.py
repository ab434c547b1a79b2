"""Arrow IPC in and out for ``EmbedArrow`` / ``EmbedSparseArrow`` (pure, no I/O).

Input: ``arrow_ipc`` is an Arrow IPC *stream* (not the file format),
uncompressed or LZ4_FRAME-compressed. Every record batch is read, in order
(tei-manager reads only the first; a one-batch stream means the same to both).
The texts are column 0 whatever its name (clients call it ``text``), which must
be ``Utf8`` or ``LargeUtf8``.

Nulls: a null row is refused with INVALID_ARGUMENT naming the row, never
dropped. tei-manager drops null rows, so its output no longer lines up with
its input; refusing keeps the invariant *output row i is the embedding of
input row i* and tells the client which row to fix. A stream with no batch, or
with batches but no rows, is refused too: an empty answer would need an
embedding dimension nobody asked the backend for.

Output: one LZ4_FRAME-compressed IPC stream with one batch and one column,
exactly tei-manager's schemas:

* dense: ``embeddings: FixedSizeList<item: float32 not null, dim> not null``;
* sparse: ``sparse_embeddings: List<item: Struct<index: uint32 not null,
  value: float32 not null> not null> not null`` (32-bit offsets).

Options: an Arrow batch carries no per-row options; ``EmbedArrowRequest``'s
``truncate`` and ``normalize`` apply to every row, each row going to the
instance as one ``tei.v1.EmbedRequest`` (over one ``EmbedStream``) with them
set. ``normalize`` is a plain proto3 bool in tei-manager 0.12's proto, so it
has no unset state: it is sent to the instance *explicitly*, with presence,
whatever its value, which is TEI's own semantics for a request that states
its choice (true normalizes, false returns the raw pooled vector). Sending
false as "unset" instead would let a TEI 1.9 instance (or the embedded
backend) apply its default, true, and a client asking for raw vectors would
silently get normalized ones. A client that leaves the field out gets raw
vectors, as it would from tei-manager 0.12. ``EmbedSparseArrow`` has no
``normalize`` (sparse vectors are never normalized).

``noop`` answers come from `noop_dense` (``rows x 384`` zeros) and
`noop_sparse` (``(i, 1.0), (i+100, 0.5), (i+200, 0.25)`` for row i), as the
Rust peer's, so benchmarks of the multiplexer alone compare like for like.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Iterable, Sequence

import pyarrow as pa

__all__ = [
    "NOOP_DIM",
    "ArrowInputError",
    "DenseBuilder",
    "SparseBuilder",
    "dense_schema",
    "noop_dense",
    "noop_sparse",
    "read_texts",
    "sparse_schema",
]

NOOP_DIM = 384
"""The dimension of ``noop`` dense output (tei-manager's)."""

_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")  # LZ4_FRAME

_SPARSE_ITEM = pa.struct(
    [
        pa.field("index", pa.uint32(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)


class ArrowInputError(ValueError):
    """The request's Arrow bytes cannot be used; the message is the client's INVALID_ARGUMENT."""


def dense_schema(dim: int) -> pa.Schema:
    """``embeddings: FixedSizeList<float32, dim>``, as tei-manager writes it."""
    item = pa.field("item", pa.float32(), nullable=False)
    return pa.schema([pa.field("embeddings", pa.list_(item, dim), nullable=False)])


def sparse_schema() -> pa.Schema:
    """``sparse_embeddings: List<Struct<index: uint32, value: float32>>`` (tei-manager's)."""
    item = pa.field("item", _SPARSE_ITEM, nullable=False)
    return pa.schema([pa.field("sparse_embeddings", pa.list_(item), nullable=False)])


def read_texts(data: bytes) -> list[str]:
    """The texts of column 0 of every batch of the IPC stream ``data``, in row order.

    Raises `ArrowInputError` for bytes that are not an IPC stream, a first
    column that is not Utf8/LargeUtf8, a null row (named by its index over the
    whole stream), or a stream without rows.
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        schema = reader.schema
        batches = list(reader)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ArrowInputError(f"Invalid Arrow IPC: {exc}") from None
    if len(schema) == 0:
        raise ArrowInputError("Arrow input has no columns")
    column_type = schema.field(0).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ArrowInputError(
            f"First column must be a string column (Utf8 or LargeUtf8), "
            f"got {column_type} in column '{schema.field(0).name}'"
        )
    if not batches:
        raise ArrowInputError("No RecordBatch in stream")
    texts: list[str] = []
    for batch in batches:
        column = batch.column(0)
        if column.null_count:
            row = len(texts) + next(
                i for i, valid in enumerate(column.is_valid()) if not valid.as_py()
            )
            raise ArrowInputError(f"Row {row} of column '{schema.field(0).name}' is null")
        texts.extend(column.to_pylist())
    if not texts:
        raise ArrowInputError("Arrow input has no rows")
    return texts


def _write(schema: pa.Schema, column: pa.Array) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=_WRITE_OPTIONS) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    return bytes(sink.getvalue())


class DenseBuilder:
    """Collects dense embeddings row by row, then writes the output stream.

    Every row must have the first row's dimension (a backend that changes its
    mind mid-request is a bug worth an error, not a ragged array).
    """

    def __init__(self) -> None:
        self._values = array.array("f")
        self._dim: int | None = None
        self.rows = 0

    def add(self, embedding: Sequence[float]) -> None:
        """Append one row; raises ValueError if its dimension differs from the first row's."""
        if self._dim is None:
            self._dim = len(embedding)
        elif len(embedding) != self._dim:
            raise ValueError(
                f"backend returned {len(embedding)} dimensions for row {self.rows}, "
                f"{self._dim} for the first"
            )
        self._values.extend(embedding)
        self.rows += 1

    def to_ipc(self) -> bytes:
        """The LZ4-compressed IPC stream of the rows added so far."""
        dim = self._dim if self._dim is not None else NOOP_DIM
        values = pa.Array.from_buffers(
            pa.float32(), len(self._values), [None, pa.py_buffer(self._values)]
        )
        schema = dense_schema(dim)
        column = pa.FixedSizeListArray.from_arrays(values, type=schema.field(0).type)
        return _write(schema, column)


class SparseBuilder:
    """Collects sparse embeddings (``(index, value)`` pairs per row), then writes the output."""

    def __init__(self) -> None:
        self._offsets = array.array("i", [0])
        self._indices = array.array("I")
        self._values = array.array("f")

    @property
    def rows(self) -> int:
        """Rows added so far."""
        return len(self._offsets) - 1

    def add(self, pairs: Iterable[tuple[int, float]]) -> None:
        """Append one row of ``(index, value)`` pairs."""
        for index, value in pairs:
            self._indices.append(index)
            self._values.append(value)
        self._offsets.append(len(self._indices))

    def to_ipc(self) -> bytes:
        """The LZ4-compressed IPC stream of the rows added so far."""
        n = len(self._indices)
        indices = pa.Array.from_buffers(pa.uint32(), n, [None, pa.py_buffer(self._indices)])
        values = pa.Array.from_buffers(pa.float32(), n, [None, pa.py_buffer(self._values)])
        items = pa.StructArray.from_arrays([indices, values], fields=list(_SPARSE_ITEM))
        offsets = pa.Array.from_buffers(
            pa.int32(), len(self._offsets), [None, pa.py_buffer(self._offsets)]
        )
        schema = sparse_schema()
        column = pa.ListArray.from_arrays(offsets, items, type=schema.field(0).type)
        return _write(schema, column)


# The answer depends on the row count alone: made once per count (a few recent
# counts kept), so a noop call costs what the multiplexer's own path does.
@functools.lru_cache(maxsize=32)
def noop_dense(rows: int) -> bytes:
    """``rows`` zero vectors of `NOOP_DIM` dimensions, without a backend."""
    builder = DenseBuilder()
    zeros = [0.0] * NOOP_DIM
    for _ in range(rows):
        builder.add(zeros)
    return builder.to_ipc()


@functools.lru_cache(maxsize=32)
def noop_sparse(rows: int) -> bytes:
    """Placeholder sparse rows (three entries per row), without a backend."""
    builder = SparseBuilder()
    for i in range(rows):
        builder.add([(i, 1.0), (i + 100, 0.5), (i + 200, 0.25)])
    return builder.to_ipc()
