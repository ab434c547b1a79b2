"""gRPC status codes and statuses as teisup's own types, with no transport behind them.

Pure modules (routing, the HTTP mapping of a backend's answer, an
authorizer's refusal) name a status with these; only `teisup.rpc` turns them
into what purerpc puts on the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Status", "StatusCode"]


class StatusCode(enum.IntEnum):
    """The gRPC status codes, numbered as the protocol numbers them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, value: int) -> StatusCode:
        """The code numbered ``value``; UNKNOWN for a number the protocol does not define."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class Status:
    """A call's outcome: its code and the message that goes with it."""

    code: StatusCode
    message: str = ""
