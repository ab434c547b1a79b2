"""TLS for the manager's servers: one ``[tls]`` section, checked before anything binds.

A TLS setting that cannot be honoured is a start-up error naming the file,
never a silent fall-back to plaintext: a missing or unreadable file, a key that
does not match its certificate, a server certificate that has expired (or is
not valid yet), a CA bundle that holds no certificate, or client
authentication asked for without a CA to check clients against.
"""

from __future__ import annotations

import contextvars
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from cryptography import x509

__all__ = [
    "AllowList",
    "TlsError",
    "TlsReloader",
    "TlsSettings",
    "peer_certificate",
    "server_context",
    "validate",
]

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
    if (settings.allowed_subjects or settings.allowed_sans) and settings.client_auth == "none":
        # An allow-list with no client certificates to check would let
        # everybody in while looking as if it did not.
        raise TlsError(
            "tls: allowed_subjects / allowed_sans need client certificates: "
            "set client_auth to 'required' (or 'optional') and a ca"
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


def server_context(
    settings: TlsSettings, *, alpn: list[str], record_peer: bool = False
) -> ssl.SSLContext:
    """A server context for ``settings`` (validated first), offering ``alpn``.

    gRPC servers must offer ``["h2"]``: grpcio peers refuse a TLS server that
    negotiates no ALPN protocol. With ``record_peer``, each handshake stores
    the verified client certificate in `peer_certificate` for the task that
    did it and the tasks it starts (how the REST app sees who is calling:
    hypercorn does not pass the certificate on).
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
    if record_peer:
        context.sslobject_class = _PeerRecordingSSLObject
    return context


peer_certificate: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "teisup_peer_certificate", default=None
)
"""The client certificate verified by the TLS handshake of the current
connection (`ssl.SSLSocket.getpeercert` form), for contexts made with
``record_peer``. Trio tasks copy their parent's context when started, and
hypercorn starts a connection's request handlers from the task that ran its
handshake, so a handler sees its own connection's certificate."""


class _PeerRecordingSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        peer_certificate.set(self.getpeercert() or None)


@dataclass(frozen=True, slots=True)
class AllowList:
    """Which verified client certificates are let in: subject CNs and SANs.

    Empty on both counts: every certificate the CA vouches for. Otherwise a
    certificate is let in when its subject common name is in ``subjects`` or
    one of its DNS, IP-address, URI or e-mail SANs is in ``sans``.
    """

    subjects: frozenset[str] = frozenset()
    sans: frozenset[str] = frozenset()

    @classmethod
    def of(cls, settings: TlsSettings) -> AllowList:
        return cls(
            frozenset(settings.allowed_subjects),
            frozenset(_canonical(s) for s in settings.allowed_sans),
        )

    @property
    def restricts(self) -> bool:
        return bool(self.subjects or self.sans)

    def refusal(self, certificate: dict[str, Any] | None) -> str | None:
        """None if ``certificate`` is let in, else why not (safe to tell the client)."""
        if not self.restricts:
            return None
        if not certificate:
            return "a client certificate is required"
        names = {
            value
            for rdn in certificate.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        }
        if names & self.subjects:
            return None
        sans = {_canonical(value) for _, value in certificate.get("subjectAltName", ())}
        if sans & self.sans:
            return None
        shown = ", ".join(sorted(names)) or "(no common name)"
        return f"client certificate {shown} is not in the allow-list"


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name.strip()))
    except ValueError:
        return name.strip().lower()


class TlsReloader:
    """Loads new certificate files into live server contexts (SIGHUP).

    A context keeps serving open connections with the certificate they
    handshook with; only new handshakes see the new one. CA bundles are
    added to: a CA removed from the file stays trusted until a restart.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.contexts: list[ssl.SSLContext] = []
        self.reloads = 0

    def context(self, *, alpn: list[str], record_peer: bool = False) -> ssl.SSLContext:
        """A new server context from the settings, reloaded with the others."""
        context = server_context(self.settings, alpn=alpn, record_peer=record_peer)
        self.contexts.append(context)
        return context

    def reload(self) -> None:
        """Check the files again and load them into every context.

        Raises `TlsError` (and changes nothing) if the new files are unusable.
        """
        validate(self.settings)
        cert, key, ca = self.settings.cert, self.settings.key, self.settings.ca
        assert cert is not None
        assert key is not None
        for context in self.contexts:
            context.load_cert_chain(cert, key)
            if ca is not None:
                context.load_verify_locations(cafile=ca)
        self.reloads += 1
