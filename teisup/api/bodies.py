"""The control plane's refusals and request bodies, shared by the instance
routes (`app`) and the model routes (`models`).

A handler raises `ApiError`; its status, code and message become tei-manager's
error body (`error_response`). `json_object` reads a request's body under a
size limit and refuses, with the same codes on every route, one that is too
large, not JSON, nested too deep or not an object.
"""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response, request

from .errors import Error
from .jsonbody import JsonTooDeep, decode_json
from .responses import json_response, now

__all__ = ["ApiError", "error_response", "json_object"]


class ApiError(Exception):
    """An error with its HTTP status and machine-readable code.

    ``reason`` is teisup's finer code where tei-manager answers a general one
    (VALIDATION_ERROR for a duplicate name): clients of tei-manager match
    ``code``, and teisup's can tell the cases apart by ``reason``.
    """

    def __init__(self, status: int, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason


def error_response(status: int, code: str, message: str, reason: str | None = None) -> Response:
    """tei-manager's error body, stamped now."""
    return json_response(Error(message, code, now(), reason), status)


async def json_object(max_bytes: int, not_object: str) -> dict[str, Any]:
    """The request's body as a JSON object, or `ApiError`: 413 PAYLOAD_TOO_LARGE over
    ``max_bytes`` (announced or read), 400 INVALID_JSON, 400 VALIDATION_ERROR
    saying ``not_object`` for JSON that is not an object."""
    too_large = ApiError(413, "PAYLOAD_TOO_LARGE", f"request body over {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    body = await request.get_data(cache=False)
    assert isinstance(body, bytes)
    if len(body) > max_bytes:
        raise too_large
    try:
        data = decode_json(body)
    except JsonTooDeep as exc:
        raise ApiError(400, "INVALID_JSON", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "VALIDATION_ERROR", not_object)
    return data
