"""JSON responses, shared by the control plane and the data plane."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
from quart import Response

__all__ = ["json_response", "now"]


def now() -> str:
    """The current time as RFC 3339 UTC with a ``Z``, as error bodies carry it."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def json_response(body: Any, status: int = 200) -> Response:
    """``body`` encoded with msgspec, as ``application/json``."""
    return Response(msgspec.json.encode(body), status=status, content_type="application/json")
