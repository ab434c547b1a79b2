"""The error bodies both planes answer with, as msgspec Structs.

The handlers encode these very Structs and the OpenAPI document takes their
JSON Schema from them, so the documented shapes are the answered ones.
"""

from __future__ import annotations

import msgspec

__all__ = ["Error", "OpenAIError", "OpenAIErrorDetail", "TeiError"]


class Error(msgspec.Struct, omit_defaults=True):
    """Every control-plane error (tei-manager's shape, and teisup's ``reason``)."""

    #: What went wrong, for a person.
    error: str
    #: Machine-readable, tei-manager's: INSTANCE_NOT_FOUND, VALIDATION_ERROR, ...
    code: str
    #: RFC 3339, UTC.
    timestamp: str
    #: teisup's finer code where tei-manager's is general (a VALIDATION_ERROR
    #: that is INSTANCE_EXISTS, PORT_CONFLICT, MAX_INSTANCES_REACHED or
    #: PORT_ALLOCATION_FAILED); absent otherwise.
    reason: str | None = None


class TeiError(msgspec.Struct):
    """Errors of the TEI-style data-plane routes: TEI's two fields and teisup's."""

    error: str
    #: TEI's: Validation, Empty, NotFound, Unhealthy, Overloaded, Timeout, Backend.
    error_type: str
    #: The gRPC status name behind it (INVALID_ARGUMENT, UNAVAILABLE, ...).
    code: str
    timestamp: str


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str


class OpenAIError(msgspec.Struct):
    """OpenAI's error shape, on ``/v1/embeddings``."""

    error: OpenAIErrorDetail
