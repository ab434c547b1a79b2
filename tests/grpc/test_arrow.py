"""Arrow IPC input and output of EmbedArrow / EmbedSparseArrow: pure."""

from __future__ import annotations

import pyarrow as pa
import pytest

from teisup.grpc import arrow


def ipc(*batches: pa.RecordBatch, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return bytes(sink.getvalue())


def batch(
    values: list[str | None], type_: pa.DataType | None = None, name: str = "text"
) -> pa.RecordBatch:
    return pa.record_batch([pa.array(values, type_ or pa.string())], names=[name])


def refusal(data: bytes) -> str:
    with pytest.raises(arrow.ArrowInputError) as caught:
        arrow.read_texts(data)
    return str(caught.value)


def test_reads_every_batch_compressed_or_not_utf8_or_large() -> None:
    two = (batch(["a", "b"]), batch(["c"]))
    assert arrow.read_texts(ipc(*two)) == ["a", "b", "c"]
    assert arrow.read_texts(ipc(*two, compression="lz4")) == ["a", "b", "c"]
    assert arrow.read_texts(ipc(batch(["x"], pa.large_string()))) == ["x"]
    # Column 0 whatever its name, extra columns ignored (as tei-manager).
    extra = pa.record_batch([pa.array(["t"]), pa.array([1])], names=["body", "id"])
    assert arrow.read_texts(ipc(extra)) == ["t"]


def test_refusals_name_the_problem() -> None:
    assert refusal(b"\x00garbage").startswith("Invalid Arrow IPC: ")
    assert refusal(ipc(batch(["1"], pa.binary()))) == (
        "First column must be a string column (Utf8 or LargeUtf8), got binary in column 'text'"
    )
    # Null rows are numbered over the whole stream, not per batch.
    assert refusal(ipc(batch(["a", "b"]), batch(["c", None]))) == "Row 3 of column 'text' is null"
    assert refusal(ipc(batch([]))) == "Arrow input has no rows"
    assert _compression(ipc(batch(["a"]))) is None
    schema = pa.schema([pa.field("text", pa.string())])
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, schema).close()
    assert refusal(bytes(sink.getvalue())) == "No RecordBatch in stream"


def read(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def test_dense_output_is_tei_managers_schema_lz4() -> None:
    builder = arrow.DenseBuilder()
    builder.add([1.0, 2.0, 3.0])
    builder.add([4.0, 5.0, 6.0])
    data = builder.to_ipc()
    table = read(data)
    expected = pa.schema(
        [
            pa.field(
                "embeddings",
                pa.list_(pa.field("item", pa.float32(), nullable=False), 3),
                nullable=False,
            )
        ]
    )
    assert table.schema == expected
    assert table.column(0).to_pylist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert _compression(data) == "lz4_frame"
    with pytest.raises(ValueError, match="2 dimensions for row 2"):
        builder.add([1.0, 2.0])


def test_sparse_output_is_tei_managers_schema_lz4() -> None:
    builder = arrow.SparseBuilder()
    builder.add([(5, 0.5), (9, 1.5)])
    builder.add([])
    data = builder.to_ipc()
    table = read(data)
    item = pa.struct(
        [
            pa.field("index", pa.uint32(), nullable=False),
            pa.field("value", pa.float32(), nullable=False),
        ]
    )
    expected = pa.schema(
        [
            pa.field(
                "sparse_embeddings",
                pa.list_(pa.field("item", item, nullable=False)),
                nullable=False,
            )
        ]
    )
    assert table.schema == expected
    assert table.column(0).to_pylist() == [
        [{"index": 5, "value": 0.5}, {"index": 9, "value": 1.5}],
        [],
    ]
    assert _compression(data) == "lz4_frame"


def test_noop_shapes() -> None:
    dense = read(arrow.noop_dense(2))
    assert dense.num_rows == 2
    assert dense.column(0).type.list_size == arrow.NOOP_DIM
    assert set(dense.column(0).chunk(0).values.to_pylist()) == {0.0}
    sparse = read(arrow.noop_sparse(2)).column(0).to_pylist()
    assert sparse[1] == [
        {"index": 1, "value": 1.0},
        {"index": 101, "value": 0.5},
        {"index": 201, "value": 0.25},
    ]


def _compression(data: bytes) -> str | None:
    """``lz4_frame`` when the stream's buffers are LZ4 frames (their magic number)."""
    return "lz4_frame" if LZ4_FRAME_MAGIC in data else None


LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
