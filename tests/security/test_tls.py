"""TLS and client certificates on the REST API; refusing unusable TLS settings."""

from __future__ import annotations

import datetime
import ssl
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from teisup.security import AllowList, TlsError, TlsSettings, server_context, validate

from ..service.test_service_e2e import teisup

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_files(ca: trustme.CA, directory: Path, **kwargs: object) -> tuple[Path, Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", **kwargs)  # type: ignore[arg-type]
    cert, key, bundle = directory / "server.pem", directory / "server-key.pem", directory / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    return cert, key, bundle


def client_context(ca: trustme.CA, client: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


def test_usable_settings_give_a_context_offering_h2(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key, bundle = server_files(ca, tmp_path)
    settings = TlsSettings(cert=str(cert), key=str(key), ca=str(bundle), client_auth="required")
    context = server_context(settings, alpn=["h2"])
    assert context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing cert", "server.pem: No such file"),
        ("expired", "expired on"),
        ("not yet valid", "not valid before"),
        ("wrong key", "does not match"),
        ("no ca for clients", "needs a ca"),
        ("key without cert", "go together"),
        ("garbage ca", "holds no PEM certificate"),
        ("allow-list without client certificates", "need client certificates"),
    ],
)
def test_unusable_settings_are_refused_naming_the_file(
    ca: trustme.CA, tmp_path: Path, case: str, message: str
) -> None:
    cert, key, bundle = server_files(ca, tmp_path)
    settings = TlsSettings(cert=str(cert), key=str(key), ca=str(bundle))
    if case == "missing cert":
        cert.unlink()
    elif case == "expired":
        server_files(ca, tmp_path, not_before=NOW - datetime.timedelta(days=10),
                     not_after=NOW - datetime.timedelta(days=1))  # fmt: skip
    elif case == "not yet valid":
        server_files(ca, tmp_path, not_before=NOW + datetime.timedelta(days=1))
    elif case == "wrong key":
        other = ca.issue_cert("127.0.0.1")
        other.private_key_pem.write_to_path(str(key))
    elif case == "no ca for clients":
        settings = TlsSettings(cert=str(cert), key=str(key), client_auth="required")
    elif case == "key without cert":
        settings = TlsSettings(key=str(key))
    elif case == "garbage ca":
        bundle.write_text("not a certificate\n")
    elif case == "allow-list without client certificates":
        settings = TlsSettings(cert=str(cert), key=str(key), allowed_subjects=["client"])
    with pytest.raises(TlsError, match=message):
        validate(settings)


async def test_a_bad_tls_setting_stops_teisup_at_start(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key, _ = server_files(
        ca, tmp_path, not_before=NOW - datetime.timedelta(days=10),
        not_after=NOW - datetime.timedelta(days=1),
    )  # fmt: skip
    result = await trio.run_process(
        [sys.executable, "-m", "teisup", "--state-file", str(tmp_path / "s.toml")],
        env={"TEISUP_TLS_CERT": str(cert), "TEISUP_TLS_KEY": str(key), "PATH": "/usr/bin:/bin"},
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert str(cert).encode() in result.stderr
    assert b"expired" in result.stderr


async def test_rest_mtls_lets_in_only_clients_the_ca_vouches_for(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key, bundle = server_files(ca, tmp_path)
    env = {
        "TEISUP_TLS_CERT": str(cert),
        "TEISUP_TLS_KEY": str(key),
        "TEISUP_TLS_CA": str(bundle),
        "TEISUP_TLS_CLIENT_AUTH": "required",
        "TEISUP_DEFAULT_INSTANCE": "false",
    }
    good = ca.issue_cert("client@example.com", common_name="client")
    stranger = trustme.CA().issue_cert("client@example.com", common_name="client")
    expired = ca.issue_cert(
        "client@example.com", not_before=NOW - datetime.timedelta(days=10),
        not_after=NOW - datetime.timedelta(days=1),
    )  # fmt: skip
    verify = client_context(ca, good)
    async with teisup(tmp_path, env=env, scheme="https", client={"verify": verify}) as t:
        assert (await t.http.get("/health")).status_code == 200
        assert (await t.http.get("/instances")).json() == []
        for client in (None, stranger, expired):
            context = ssl.create_default_context()
            ca.configure_trust(context)
            if client is not None:
                client.configure_cert(context)
            async with httpx.AsyncClient(base_url=t.url, verify=context, timeout=10) as other:
                with pytest.raises(httpx.TransportError):
                    await other.get("/health")
        # curl, a client nobody on this team wrote, with the good certificate.
        (tmp_path / "client.pem").write_bytes(
            b"".join(p.bytes() for p in good.cert_chain_pems) + good.private_key_pem.bytes()
        )
        out = await trio.run_process(
            ["curl", "-sf", "--cacert", str(bundle), "--cert", str(tmp_path / "client.pem"),
             f"{t.url}/health"],
            capture_stdout=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0
        assert b'"status":"healthy"' in out.stdout
        assert await t.stop() == 0


def _cert(cn: str | None, *sans: tuple[str, str]) -> dict[str, object]:
    subject = ((("commonName", cn),),) if cn is not None else ()
    return {"subject": subject, "subjectAltName": sans}


@pytest.mark.parametrize(
    ("certificate", "let_in"),
    [
        (_cert("good-client"), True),
        (_cert("other", ("DNS", "SVC.example.com")), True),  # DNS names ignore case
        (_cert("other", ("IP Address", "10.0.0.7")), True),
        (_cert("other", ("IP Address", "10.0.0.8")), False),
        (_cert("other", ("DNS", "svc.example.com.evil.org")), False),
        (_cert("Good-Client"), False),  # common names are compared exactly
        (_cert(None), False),
        (None, False),  # no certificate at all
    ],
)
def test_allow_list_by_subject_cn_or_san(
    certificate: dict[str, object] | None, let_in: bool
) -> None:
    allow = AllowList.of(
        TlsSettings(allowed_subjects=["good-client"], allowed_sans=["svc.example.com", "10.0.0.7"])
    )
    refusal = allow.refusal(certificate)
    assert (refusal is None) is let_in
    if certificate is None:
        assert refusal == "a client certificate is required"


def test_an_empty_allow_list_lets_in_whoever_the_ca_vouches_for() -> None:
    assert AllowList().refusal(None) is None
    assert AllowList().refusal(_cert("anyone")) is None
