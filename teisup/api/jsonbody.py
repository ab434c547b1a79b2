"""Request bodies as JSON, refused before decoding when nested too deep.

msgspec decodes nested arrays and objects recursively and raises
`RecursionError` about 1000 levels down, which a 2 KB body reaches. No
request body of this API nests more than a few levels, so a body nested
deeper than `MAX_DEPTH` is refused by a scan that does not recurse.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = ["MAX_DEPTH", "JsonTooDeep", "decode_json", "nesting_exceeds"]

#: The deepest nesting of arrays and objects a request body may have.
MAX_DEPTH = 64

#: A JSON string, escapes included (brackets inside strings do not nest);
#: written as an unrolled loop, which the regex engine runs without backtracking.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: Nesting is counted as the decoder recurses: any opener one level deeper,
#: any closer one level up (a closer of the wrong kind stops the decoder there).
_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")


class JsonTooDeep(ValueError):
    """A body nests arrays and objects deeper than the limit."""


def nesting_exceeds(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``body`` opens more than ``limit`` arrays or objects inside each other.

    Linear in the body's length, with no recursion. Malformed JSON may get
    either answer; the decoder refuses it afterwards.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # fewer openers in all (strings included) than the limit
    parens = _STRING.sub(b"", body).translate(_AS_PARENS, _NOT_BRACKETS)
    deep_run = b"(" * (limit + 1)
    # Each pass removes every adjacent pair, the innermost level of every
    # nest: what nests at most `limit` deep is gone after `limit` passes.
    for _ in range(limit):
        if not parens:
            return False
        if deep_run in parens:
            return True  # that many openers in a row
        reduced = parens.replace(b"()", b"")
        if reduced == parens:
            # Only closers before openers are left: a decoder stops at the
            # first closer, or reaches the end within one run of openers.
            return False
        parens = reduced
    return bool(parens)


def decode_json(body: bytes, limit: int = MAX_DEPTH) -> Any:
    """``body`` decoded, or `JsonTooDeep` / `msgspec.DecodeError`."""
    if nesting_exceeds(body, limit):
        raise JsonTooDeep(f"JSON nested deeper than {limit} levels")
    return msgspec.json.decode(body)
