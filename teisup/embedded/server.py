"""The embedded backend's gRPC server: `teisup.rpc.Server` with TEI's services and API key.

Everything TEI's call handling needs is an option of the one server:

* **Response headers.** A unary TEI call answers with initial metadata
  (``x-compute-time`` and friends) known only once the result is: handlers
  add them to `teisup.rpc.ServerCall.headers`, and the first message carries
  them. An error before any message is a trailers-only response, as tonic sends.
* **API key.** With ``--api-key``, calls to the ``tei.v1`` services need
  ``authorization: Bearer <key>`` or get UNAUTHENTICATED ``No valid auth
  token`` (`api_key_authorizer`); health and reflection stay open, as in TEI.
* **Drain.** `teisup.rpc.Server.drain` refuses new calls (UNAVAILABLE) and
  waits for the in-flight ones, for a SIGTERM that finishes what was started.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from teisup.rpc import Authorizer, ReflectionService, Server, ServerCall, Status, StatusCode

__all__ = ["api_key_authorizer", "tei_server"]

REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def api_key_authorizer(api_key: str | None, protected: Iterable[str]) -> Authorizer | None:
    """The gate TEI's ``--api-key`` puts on the ``protected`` services (None: no key, no gate)."""
    if api_key is None:
        return None
    wanted = ("authorization", f"Bearer {api_key}")
    guarded = frozenset(protected)

    def authorize(call: ServerCall) -> Status | None:
        if call.service in guarded and wanted not in call.metadata:
            return Status(StatusCode.UNAUTHENTICATED, "No valid auth token")
        return None

    return authorize


def tei_server(
    port: int,
    *,
    host: str,
    services: Iterable[Any],
    api_key: str | None,
    protected: Iterable[str],
) -> Server:
    """The server for ``services``, reflection (v1alpha, as TEI) listing them all."""
    server = Server(port, host=host, authorize=api_key_authorizer(api_key, protected))
    server.add_services(services)
    server.add_service(ReflectionService([*server.service_names, REFLECTION]))
    return server
