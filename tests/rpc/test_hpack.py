"""Remembered HPACK blocks: what a stock hpack peer decodes is always what was sent."""

from __future__ import annotations

import random

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from teisup.rpc._hpack import _RememberingDecoder, _RememberingEncoder

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/tei.v1.Embed/Embed"),
    (":authority", "127.0.0.1:5000"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
TRAILERS = [("grpc-status", "0")]


def as_text(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (n.decode() if isinstance(n, bytes) else n, v.decode() if isinstance(v, bytes) else v)
        for n, v in headers
    ]


def test_a_repeated_block_is_the_same_bytes_and_decodes_as_sent() -> None:
    encoder, peer = _RememberingEncoder(), Decoder()
    first = encoder.encode(REQUEST)
    second = encoder.encode(REQUEST)
    third = encoder.encode(iter(REQUEST))  # h2 passes a generator
    assert len(second) < len(first)  # the first use indexed the headers
    assert third == second
    for block in (first, second, third):
        assert as_text(peer.decode(block)) == REQUEST


def test_grpc_timeout_never_touches_the_table_and_comes_last() -> None:
    encoder, peer = _RememberingEncoder(), Decoder()
    with_timeout = [*REQUEST[:4], ("grpc-timeout", "1000m"), *REQUEST[4:]]
    peer.decode(encoder.encode(with_timeout))
    tables = []
    for value in ("999m", "998m", "997m"):
        headers = [*REQUEST[:4], ("grpc-timeout", value), *REQUEST[4:]]
        decoded = as_text(peer.decode(encoder.encode(headers)))
        assert decoded == [*REQUEST, ("grpc-timeout", value)]
        tables.append(list(peer.header_table.dynamic_entries))
    assert tables[0] == tables[1] == tables[2]  # no value of it was indexed


def test_sensitive_headers_and_table_resizes_stay_correct() -> None:
    encoder, peer = _RememberingEncoder(), Decoder()
    secret = [*REQUEST, NeverIndexedHeaderTuple("authorization", "Bearer s3cret")]
    for _ in range(2):
        assert as_text(peer.decode(encoder.encode(secret))) == as_text(secret)
    assert all(b"s3cret" not in v for _, v in peer.header_table.dynamic_entries)
    peer.decode(encoder.encode(REQUEST))
    encoder.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE shrank it
    block = encoder.encode(REQUEST)
    assert as_text(peer.decode(block)) == REQUEST
    assert len(peer.header_table.dynamic_entries) == 0
    encoder.header_table_size = 4096
    for _ in range(3):
        assert as_text(peer.decode(encoder.encode(REQUEST))) == REQUEST


def random_blocks(seed: int, count: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    shapes = [REQUEST, RESPONSE, TRAILERS]
    blocks = []
    for _ in range(count):
        block = list(rng.choice(shapes))
        for _ in range(rng.randrange(3)):
            block.append((f"x-meta-{rng.randrange(6)}", "v" * rng.randrange(1, 400)))
        if rng.random() < 0.3:
            block.insert(1, ("grpc-timeout", f"{rng.randrange(1, 10**8)}u"))
        blocks.append(block)
    return blocks


def test_a_long_random_exchange_decodes_as_a_stock_peer_would() -> None:
    """Both directions against stock hpack, with table churn and evictions (small table)."""
    ours, theirs = _RememberingEncoder(), Decoder()
    stock, remembering = Encoder(), _RememberingDecoder(65536, 4096)
    for table in (ours, stock):
        table.header_table_size = 512
    for i, block in enumerate(random_blocks(7, 3000)):
        expected = [h for h in block if h[0] != "grpc-timeout"] + [
            h for h in block if h[0] == "grpc-timeout"
        ]
        assert as_text(theirs.decode(ours.encode(block))) == expected, i
        wire = stock.encode(block)
        assert as_text(remembering.decode(wire, raw=True)) == block, i
