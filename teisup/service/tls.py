"""TLS for the manager's servers: one ``[tls]`` section, checked before anything binds.

A TLS setting that cannot be honoured is a start-up error naming the file,
never a silent fall-back to plaintext: a missing or unreadable file, a key that
does not match its certificate, a server certificate that has expired (or is
not valid yet), a CA bundle that holds no certificate, or client
authentication asked for without a CA to check clients against.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Literal

import msgspec
from cryptography import x509

__all__ = ["TlsError", "TlsSettings", "server_context", "validate"]

ClientAuth = Literal["none", "optional", "required"]


class TlsError(ValueError):
    """The TLS configuration cannot be used; the message names the file."""


class TlsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """``[tls]``: the server certificate and key, and how clients are checked.

    ``allowed_subjects`` (client certificate common names) and
    ``allowed_sans`` (DNS names or IP addresses) narrow which verified clients
    are let in; empty means every client the CA vouches for.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_auth: ClientAuth = "none"
    allowed_subjects: list[str] = msgspec.field(default_factory=list)
    allowed_sans: list[str] = msgspec.field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.key is not None


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"tls {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TlsError(f"tls {what} {path} is empty")
    return data


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsError(f"tls {what} {path} holds no PEM certificate: {exc}") from None
    return certificates


def validate(settings: TlsSettings, *, now: datetime.datetime | None = None) -> None:
    """Check everything a server context needs; raise `TlsError` naming the file."""
    if settings.allowed_subjects or settings.allowed_sans:
        # Accepting a security setting that is not enforced would be worse
        # than refusing it (tei-manager's documented-but-absent settings).
        raise TlsError(
            "tls: allowed_subjects and allowed_sans are not enforced by this version yet; "
            "remove them (every client the CA vouches for is let in) or upgrade"
        )
    if not settings.enabled:
        if settings.ca or settings.client_auth != "none":
            raise TlsError("tls: a CA or client_auth needs cert and key too")
        return
    if settings.cert is None or settings.key is None:
        raise TlsError("tls: cert and key go together; one of them is missing")
    moment = now or datetime.datetime.now(datetime.UTC)
    leaf = _certificates(settings.cert, "cert")[0]
    if moment > leaf.not_valid_after_utc:
        raise TlsError(
            f"tls cert {settings.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if moment < leaf.not_valid_before_utc:
        raise TlsError(
            f"tls cert {settings.cert} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    _read(settings.key, "key")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(settings.cert, settings.key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls key {settings.key} does not match cert {settings.cert} (or is not a key): "
            f"{exc.reason or exc}"
        ) from None
    if settings.client_auth != "none" and settings.ca is None:
        raise TlsError(f"tls: client_auth = {settings.client_auth!r} needs a ca to check clients")
    if settings.ca is not None:
        _certificates(settings.ca, "ca")


def server_context(settings: TlsSettings, *, alpn: list[str]) -> ssl.SSLContext:
    """A server context for ``settings`` (validated first), offering ``alpn``.

    gRPC servers must offer ``["h2"]``: grpcio peers refuse a TLS server that
    negotiates no ALPN protocol.
    """
    validate(settings)
    assert settings.cert is not None
    assert settings.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert, settings.key)
    if settings.ca is not None:
        context.load_verify_locations(cafile=settings.ca)
    context.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[settings.client_auth]
    context.set_alpn_protocols(alpn)
    return context
