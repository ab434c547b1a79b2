"""The API token: how a request presents it, and a comparison that leaks nothing.

A request carries the token as ``Authorization: Bearer <token>`` (HTTP) or
``authorization: Bearer <token>`` metadata (gRPC). The scheme name is
case-insensitive (RFC 9110 §11.1); the token is not. The comparison hashes both
sides first, so it takes the same time whatever the length or content of what
was sent.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["bearer_matches"]


def bearer_matches(header: str | bytes | None, token: str) -> bool:
    """Whether the ``Authorization`` value ``header`` presents ``token``."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, given = (header or "").strip().partition(" ")
    presented = given.strip() if scheme.lower() == "bearer" else ""
    # Both digests are computed whatever the scheme, so a wrong scheme costs
    # the same as a wrong token.
    same = hmac.compare_digest(
        hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(token.encode()).digest(),
    )
    return same and bool(presented)
