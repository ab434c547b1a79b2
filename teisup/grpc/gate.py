"""`GrpcGate`: who may call the gRPC servers (the multiplexer, in-process or in a worker).

It applies the same allow-list and API token as the REST app.
"""

from __future__ import annotations

from teisup.rpc import ServerCall, Status, StatusCode

from ..security import AllowList, bearer_matches
from .handlers import SERVICE_NAME

__all__ = ["GrpcGate"]


class GrpcGate:
    """The gRPC servers' gate: the allow-list for every call, the token for the data plane.

    Health and reflection stay open to any client the TLS layer let in, as
    /health does over REST.
    """

    def __init__(self, *, api_token: str | None, allow_list: AllowList, tls: bool) -> None:
        self._api_token = api_token
        # Without TLS there is no verified certificate to check.
        self._allow_list = allow_list if tls else None

    def __call__(self, call: ServerCall) -> Status | None:
        """None to let the call in, else the status refusing it."""
        allow_list = self._allow_list
        refusal = allow_list.refusal(call.peer.certificate) if allow_list is not None else None
        if refusal is not None:
            return Status(StatusCode.PERMISSION_DENIED, refusal)
        if self._api_token is not None and call.service == SERVICE_NAME:
            metadata = dict(call.metadata)
            if not bearer_matches(metadata.get("authorization"), self._api_token):
                return Status(StatusCode.UNAUTHENTICATED, "missing or wrong API token")
        return None
