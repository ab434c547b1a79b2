"""The API token as a request presents it."""

from __future__ import annotations

import pytest

from teisup.security import bearer_matches

TOKEN = "t0ken-with-enough-entropy"


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),  # the scheme is case-insensitive (RFC 9110)
        (f"BEARER  {TOKEN} ", True),
        (f"Bearer {TOKEN}".encode(), True),  # gRPC metadata may arrive as bytes
        (f"Bearer {TOKEN.upper()}", False),  # the token is not
        (TOKEN, False),  # no scheme
        (f"Basic {TOKEN}", False),
        (f"Bearer {TOKEN}x", False),
        ("Bearer ", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_matches(header: str | bytes | None, matches: bool) -> None:
    assert bearer_matches(header, TOKEN) is matches
