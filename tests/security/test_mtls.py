"""Mutual TLS end to end: the gRPC multiplexer and the REST API of a real ``teisup``.

Certificates are made here with trustme; clients are grpcio, httpx, curl and
teisup-bench. One manager runs with client certificates required, an
allow-list and an API token; the TEI test double is the instance.
"""

from __future__ import annotations

import datetime
import signal
import ssl
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trustme

from ..service.test_service_e2e import SMALL, Teisup, teisup, wait_state
from .test_tls import server_files

NOW = datetime.datetime.now(datetime.UTC)
TOKEN = "mtls-token-abcdef0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Pki(SimpleNamespace):
    """The CA, the server files, and client certificates of every kind."""

    ca: trustme.CA
    cert: Path
    key: Path
    bundle: Path
    allowed: trustme.LeafCert  # CN in allowed_subjects
    by_san: trustme.LeafCert  # CN not allowed, but a SAN in allowed_sans
    outsider: trustme.LeafCert  # the CA vouches for it; not in the allow-list
    stranger: trustme.LeafCert  # another CA
    expired: trustme.LeafCert


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    cert, key, bundle = server_files(ca, tmp_path)
    return Pki(
        ca=ca,
        cert=cert,
        key=key,
        bundle=bundle,
        allowed=ca.issue_cert("client.example.com", common_name="good-client"),
        by_san=ca.issue_cert("svc.example.com", common_name="svc"),
        outsider=ca.issue_cert("other.example.com", common_name="other-client"),
        stranger=trustme.CA().issue_cert("client.example.com", common_name="good-client"),
        expired=ca.issue_cert(
            "client.example.com",
            common_name="good-client",
            not_before=NOW - datetime.timedelta(days=10),
            not_after=NOW - datetime.timedelta(days=1),
        ),
    )


def pem_files(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    chain, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return chain, key


def https(pki: Pki, leaf: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    if leaf is not None:
        leaf.configure_cert(context)
    return context


MTLS_CONFIG = """
[tls]
client_auth = "required"
allowed_subjects = ["good-client"]
allowed_sans = ["svc.example.com"]
"""


def mtls_env(pki: Pki) -> dict[str, str]:
    return {
        "TEISUP_TLS_CERT": str(pki.cert),
        "TEISUP_TLS_KEY": str(pki.key),
        "TEISUP_TLS_CA": str(pki.bundle),
        "TEISUP_API_TOKEN": TOKEN,
        "TEISUP_DEFAULT_INSTANCE": "false",
    }


def grpcio_info(
    port: int, stubs: SimpleNamespace, pki: Pki, leaf: trustme.LeafCert | None, token: str | None
) -> Any:
    """Info through the multiplexer with grpcio over mTLS: the answer, or the grpc.RpcError."""
    import grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem.bytes(),
        private_key=leaf.private_key_pem.bytes() if leaf else None,
        certificate_chain=b"".join(p.bytes() for p in leaf.cert_chain_pems) if leaf else None,
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
        request = stubs.pb2.InfoRequest(target=stubs.pb2.Target(instance_name="bge-small"))
        try:
            return stub.Info(request, timeout=20, metadata=metadata)
        except grpc.RpcError as error:
            return error


async def running_with_instance(t: Teisup) -> None:
    created = await t.http.post("/instances", json=SMALL)
    assert created.status_code == 201, created.text
    await wait_state(t, "bge-small", "running")


async def test_grpc_and_rest_mtls_allow_lists_and_token(
    tmp_path: Path, pki: Pki, mux_stubs: SimpleNamespace
) -> None:
    import grpc

    client = {"verify": https(pki, pki.allowed), "headers": AUTH}
    async with teisup(tmp_path, MTLS_CONFIG, env=mtls_env(pki), scheme="https", client=client) as t:
        await running_with_instance(t)

        async def info(leaf: trustme.LeafCert | None, token: str | None = TOKEN) -> Any:
            return await trio.to_thread.run_sync(
                grpcio_info, t.grpc_port, mux_stubs, pki, leaf, token
            )

        # gRPC: allowed by CN, allowed by SAN; with grpcio, a client nobody here wrote.
        for leaf in (pki.allowed, pki.by_san):
            answer = await info(leaf)
            assert answer.model_id == SMALL["model_id"], answer
        # The data plane wants the token; the allow-list comes first.
        for token, code in ((None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED")):
            refused = await info(pki.allowed, token)
            assert refused.code() == getattr(grpc.StatusCode, code)
        outsider = await info(pki.outsider)
        assert outsider.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "other-client" in outsider.details()
        # No certificate, another CA, expired: the handshake fails.
        for leaf in (None, pki.stranger, pki.expired):
            with trio.fail_after(30):
                failed = await info(leaf)
            assert failed.code() == grpc.StatusCode.UNAVAILABLE

        # REST: the same rules, 403 for a verified client outside the allow-list.
        assert (await t.http.get("/instances")).status_code == 200
        async with httpx.AsyncClient(
            base_url=t.url, verify=https(pki, pki.by_san), headers=AUTH
        ) as by_san:
            assert (await by_san.get("/instances")).status_code == 200
        async with httpx.AsyncClient(
            base_url=t.url, verify=https(pki, pki.outsider), headers=AUTH
        ) as outsider_http:
            denied = await outsider_http.get("/instances")
            assert denied.status_code == 403
            assert denied.json()["code"] == "FORBIDDEN"
            assert (await outsider_http.get("/health")).status_code == 403
        for leaf in (None, pki.stranger, pki.expired):
            async with httpx.AsyncClient(base_url=t.url, verify=https(pki, leaf)) as other:
                with pytest.raises(httpx.TransportError):
                    await other.get("/health")
        # curl with the allowed certificate and the token.
        chain, key = pem_files(tmp_path, "good", pki.allowed)
        out = await trio.run_process(
            ["curl", "-sf", "--cacert", str(pki.bundle), "--cert", str(chain), "--key", str(key),
             "-H", f"Authorization: {AUTH['Authorization']}", f"{t.url}/instances/bge-small"],
            capture_stdout=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0
        assert b'"status":"running"' in out.stdout

        # teisup-bench: a rejected certificate fails fast, far within its deadline.
        chain, key = pem_files(tmp_path, "stranger", pki.stranger)
        bench = [
            sys.executable, "-m", "teisup.bench", "-e", f"https://127.0.0.1:{t.grpc_port}",
            "-i", "bge-small", "-n", "2", "-c", "1", "--timeout", "120",
            "--ca", str(pki.bundle), "--cert", str(chain), "--key", str(key),
        ]  # fmt: skip
        with trio.fail_after(60):
            result = await trio.run_process(bench, capture_stdout=True, check=False)
        assert result.returncode != 0
        assert b'"failed": 2' in result.stdout
        assert await t.stop() == 0
    assert not any(TOKEN in line for line in t.log)


def peer_serial(port: int, pki: Pki, alpn: str) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is shown."""
    import socket

    from cryptography import x509

    context = https(pki, pki.allowed)
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def watch_until_not_serving(
    port: int, pki: Pki, opened: trio.Event, token: trio.lowlevel.TrioToken
) -> list[int]:
    """Watch the instance's health over one grpcio stream until NOT_SERVING."""
    import grpc

    from teisup.proto.grpc.health.v1 import health_pb2

    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem.bytes(),
        private_key=pki.allowed.private_key_pem.bytes(),
        certificate_chain=b"".join(p.bytes() for p in pki.allowed.cert_chain_pems),
    )
    seen: list[int] = []
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        stream = watch(health_pb2.HealthCheckRequest(service="bge-small"), timeout=60)
        for answer in stream:
            seen.append(answer.status)
            if len(seen) == 1:
                trio.from_thread.run_sync(opened.set, trio_token=token)
            if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    return seen


async def test_sighup_reloads_the_certificate_and_keeps_open_streams(
    tmp_path: Path, pki: Pki
) -> None:
    env = {**mtls_env(pki), "TEISUP_TLS_CLIENT_AUTH": "required"}
    client = {"verify": https(pki, pki.allowed), "headers": AUTH}
    async with teisup(tmp_path, env=env, scheme="https", client=client) as t:
        await running_with_instance(t)
        api_port = int(t.url.rsplit(":", 1)[1])
        old = await trio.to_thread.run_sync(peer_serial, t.grpc_port, pki, "h2")
        assert await trio.to_thread.run_sync(peer_serial, api_port, pki, "http/1.1") == old

        opened = trio.Event()
        async with trio.open_nursery() as nursery:
            watched: list[list[int]] = []

            async def watch() -> None:
                watched.append(
                    await trio.to_thread.run_sync(
                        watch_until_not_serving,
                        t.grpc_port,
                        pki,
                        opened,
                        trio.lowlevel.current_trio_token(),
                    )
                )

            nursery.start_soon(watch)
            await opened.wait()

            # Replace the server's files (same names), then SIGHUP.
            server_files(pki.ca, tmp_path)
            t.proc.send_signal(signal.SIGHUP)
            await t.wait_log("TLS certificate reloaded")
            new = await trio.to_thread.run_sync(peer_serial, t.grpc_port, pki, "h2")
            assert new != old
            assert await trio.to_thread.run_sync(peer_serial, api_port, pki, "http/1.1") == new
            # The REST client's connection, opened before the reload, still works.
            assert (await t.http.get("/instances/bge-small")).status_code == 200
            # The stream opened before the reload still delivers: stop the instance.
            assert (await t.http.post("/instances/bge-small/stop")).status_code == 200
        assert watched[0][0] == 1  # SERVING
        assert watched[0][-1] == 2  # NOT_SERVING

        # A reload with a broken file keeps the old certificate and says so.
        pki.key.write_text("not a key\n")
        t.proc.send_signal(signal.SIGHUP)
        await t.wait_log("not reloaded")
        assert await trio.to_thread.run_sync(peer_serial, t.grpc_port, pki, "h2") == new
        assert await t.stop() == 0
    assert any(str(pki.key) in line for line in t.log)


async def test_server_only_tls_on_both_servers(
    tmp_path: Path, pki: Pki, mux_stubs: SimpleNamespace
) -> None:
    """TLS without client certificates: any client that trusts the CA gets in."""
    env = {
        "TEISUP_TLS_CERT": str(pki.cert),
        "TEISUP_TLS_KEY": str(pki.key),
        "TEISUP_DEFAULT_INSTANCE": "false",
    }
    async with teisup(tmp_path, env=env, scheme="https", client={"verify": https(pki, None)}) as t:
        await running_with_instance(t)
        answer = await trio.to_thread.run_sync(grpcio_info, t.grpc_port, mux_stubs, pki, None, None)
        assert answer.model_id == SMALL["model_id"], answer
        # Plaintext is not served next to it.
        async with httpx.AsyncClient(base_url=t.url.replace("https", "http")) as plain:
            with pytest.raises(httpx.TransportError):
                await plain.get("/health")
        assert await t.stop() == 0
