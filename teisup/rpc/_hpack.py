"""HPACK header blocks encoded and decoded once per distinct block, not once per call.

A forwarded call sends three header blocks (request headers, response
headers, trailers) and reads three, and nearly all of them are the same bytes
call after call: the same path, authority, content type, status. hpack's
`Encoder` still searches its tables header by header (the static table
linearly) and `Decoder` parses every block afresh; the two cost more than a
fifth of a forwarded call's CPU.

HPACK is stateful, so a block can be reused only while the dynamic table it
was made against is unchanged: both tables here count every change (an
entry added, a resize), and a remembered block is valid only for the count it
was made at. A block that changed the table when it was made (its first use,
with incremental indexing) is not remembered; from its second use it refers
to the table's entries and leaves the table alone, so it is.

``grpc-timeout`` differs on nearly every call. Indexed, each new value would
change the table (and void every remembered block); it is sent as a literal
that is never indexed instead (RFC 7541 §6.2.3), and the rest of its block is
remembered as usual. The peer's decoding is unaffected either way.
"""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, HeaderTuple
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

__all__ = ["remember", "remember_header_blocks"]

#: Distinct blocks kept per connection and direction (error trailers carry
#: their message, so the number of blocks is not bounded by the methods).
_MEMO_SIZE = 256


def remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``value`` under ``key`` in a per-connection memo of at most `_MEMO_SIZE` entries
    (full, it starts again empty: the blocks in use come back at once)."""
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = value


_TIMEOUT_NAMES = frozenset({"grpc-timeout", b"grpc-timeout"})


class _CountingTable(HeaderTable):  # type: ignore[misc]  # hpack is untyped
    """hpack's header table, counting its changes in ``generation``."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)


def _literal_never_indexed(name: Any, value: Any) -> bytes:
    """One header as a never-indexed literal with a literal name: the same bytes whatever
    the table holds."""
    raw_name = name.encode() if isinstance(name, str) else bytes(name)
    raw_value = value.encode() if isinstance(value, str) else bytes(value)
    return b"".join(
        (
            b"\x10",
            bytes(encode_integer(len(raw_name), 7)),
            raw_name,
            bytes(encode_integer(len(raw_value), 7)),
            raw_value,
        )
    )


class _RememberingEncoder(Encoder):  # type: ignore[misc]
    """hpack's encoder, reusing the bytes of a block it encoded before (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _CountingTable()
        self._memo: dict[tuple[Any, ...], tuple[int, bytes]] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if isinstance(headers, dict):
            return bytes(super().encode(headers, huffman))
        table = self.header_table
        items = iter(headers)
        seen: list[Any] = []
        rest: list[Any] = []
        volatile = b""
        for header in items:
            seen.append(header)
            if isinstance(header, HeaderTuple) or len(header) != 2:
                # Flagged sensitive (never indexed) or not: encoded as hpack does.
                return bytes(super().encode([*seen, *items], huffman))
            if header[0] in _TIMEOUT_NAMES:
                volatile += _literal_never_indexed(*header)
            else:
                rest.append(header)
        key = tuple(rest)
        if not table.resized:
            remembered = self._memo.get(key)
            if remembered is not None and remembered[0] == table.generation:
                return remembered[1] + volatile
        generation = table.generation
        block = bytes(super().encode(rest, huffman))
        if table.generation == generation:
            remember(self._memo, key, (generation, block))
        return block + volatile


class _RememberingDecoder(Decoder):  # type: ignore[misc]
    """hpack's decoder, reusing what it decoded from the same bytes before (module docstring)."""

    def __init__(self, max_header_list_size: int, max_allowed_table_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.max_allowed_table_size = max_allowed_table_size
        self.header_table = _CountingTable()
        self._memo: dict[tuple[bytes, bool], tuple[int, int, list[Any]]] = {}

    def decode(self, data: Any, raw: bool = False) -> list[Any]:
        table = self.header_table
        key = (bytes(data), raw)
        remembered = self._memo.get(key)
        if (
            remembered is not None
            and remembered[0] == table.generation
            and remembered[1] == self.max_header_list_size
        ):
            return list(remembered[2])
        generation = table.generation
        headers: list[Any] = super().decode(data, raw)
        if table.generation == generation:
            remember(self._memo, key, (generation, self.max_header_list_size, headers))
            return list(headers)
        return headers


def remember_header_blocks(h2_connection: Any) -> None:
    """Give a fresh h2 connection (nothing sent or received yet) remembering HPACK coders."""
    decoder = h2_connection.decoder
    h2_connection.encoder = _RememberingEncoder()
    h2_connection.decoder = _RememberingDecoder(
        decoder.max_header_list_size, decoder.max_allowed_table_size
    )
