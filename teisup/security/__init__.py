"""Who may talk to teisup: the API token and TLS (server certificates, mTLS allow-lists).

Below `teisup.api` and `teisup.grpc`, which both enforce it, and below
`teisup.service`, whose configuration holds its ``[tls]`` section; it imports
no other teisup package.
"""

from .tls import (
    AllowList,
    TlsError,
    TlsReloader,
    TlsSettings,
    peer_certificate,
    server_context,
    validate,
)
from .tokens import bearer_matches

__all__ = [
    "AllowList",
    "TlsError",
    "TlsReloader",
    "TlsSettings",
    "bearer_matches",
    "peer_certificate",
    "server_context",
    "validate",
]
