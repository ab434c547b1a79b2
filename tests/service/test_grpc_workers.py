"""``grpc_workers``: the multiplexer in worker processes on one port, as a user runs it.

A real teisup with ``grpc_workers = 2`` and the TEI test double; clients are
grpcio. Which worker serves a connection is the kernel's choice
(SO_REUSEPORT), so each test opens connections until every worker holds one
(read from ``/proc``: whose socket is the server end of it) and then checks
each worker through its own connection.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trustme

from teisup.proto.grpc.health.v1 import health_pb2

from ..instances.conftest import wait_gone
from ..ports import free_port
from ..security.test_mtls import MTLS_CONFIG, TOKEN, Pki, mtls_env, pki  # noqa: F401
from .test_service_e2e import SMALL, Teisup, teisup, wait_state

WORKERS = 2
# The environment, not the file: tests/conftest.py sets TEISUP_GRPC_WORKERS=1
# for every other teisup the suite runs, and the environment beats the file.
ENV = {"TEISUP_GRPC_WORKERS": str(WORKERS)}
SERVING_LINE = re.compile(r"gRPC worker (\d+) \(pid (\d+)\) serving")


def server_sockets(port: int) -> set[int]:
    """Inodes of the established TCP sockets whose local port is ``port``."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode:
                inodes.add(inode)
    return inodes


def sockets_of(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds."""
    found: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def worker_pids(t: Teisup) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the manager's log."""
    pids: dict[int, int] = {}
    for line in t.log:
        if m := SERVING_LINE.search(line):
            pids[int(m.group(1))] = int(m.group(2))
    return pids


async def wait_workers(t: Teisup, *, not_pids: frozenset[int] = frozenset()) -> dict[int, int]:
    """Until every worker serves with a pid not in ``not_pids``; index -> pid."""
    with trio.fail_after(60):
        while True:
            pids = worker_pids(t)
            if len(pids) == WORKERS and not set(pids.values()) & not_pids:
                return pids
            await t.logged.wait()


@contextmanager
def one_channel_per_worker(
    t: Teisup, pids: dict[int, int], connect: Callable[[], Any], touch: Callable[[Any], object]
) -> Iterator[dict[int, Any]]:
    """A grpcio channel served by each worker: index -> channel.

    ``connect`` makes a channel with a connection of its own; ``touch`` makes
    one call on it, so that it connects. Channels are opened until every
    worker holds one (each new connection is found in ``/proc``).
    """
    opened: list[Any] = []
    chosen: dict[int, Any] = {}
    try:
        for _ in range(64):
            before = server_sockets(t.grpc_port)
            channel = connect()
            opened.append(channel)
            touch(channel)
            new = server_sockets(t.grpc_port) - before
            for index, pid in pids.items():
                if new & sockets_of(pid) and index not in chosen:
                    chosen[index] = channel
            if len(chosen) == len(pids):
                break
        assert len(chosen) == len(pids), f"64 connections, all served by workers {set(chosen)}"
        yield chosen
    finally:
        for channel in opened:
            channel.close()


def insecure(port: int) -> Callable[[], Any]:
    import grpc

    # A pool of its own, so each channel makes its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return lambda: grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def health_check(channel: Any, service: str = "") -> Any:
    """``grpc.health.v1.Health/Check``: the response, or the grpc.RpcError."""
    import grpc

    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        return check(health_pb2.HealthCheckRequest(service=service), timeout=20)
    except grpc.RpcError as error:
        return error


def watch_until(channel: Any, service: str, status: int) -> None:
    """Watch ``service``'s health on ``channel`` until it reads ``status``."""
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answers = watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
    try:
        for answer in answers:
            if answer.status == status:
                return
    finally:
        answers.cancel()
    raise AssertionError(f"the watch of {service} ended before {status}")


def info(stubs: SimpleNamespace, channel: Any, token: str | None = None) -> Any:
    """Info of bge-small through the multiplexer: the answer, or the grpc.RpcError."""
    import grpc

    stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
    request = stubs.pb2.InfoRequest(target=stubs.pb2.Target(instance_name="bge-small"))
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        return stub.Info(request, timeout=20, metadata=metadata)
    except grpc.RpcError as error:
        return error


def embed(stubs: SimpleNamespace, channel: Any, text: str) -> Any:
    """Embed ``text`` on bge-small through the multiplexer: the answer, or the grpc.RpcError."""
    import grpc

    stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
    request = stubs.pb2.EmbedRequest(
        target=stubs.pb2.Target(instance_name="bge-small"),
        request=stubs.tei_pb2.EmbedRequest(inputs=text),
    )
    try:
        return stub.Embed(request, timeout=20)
    except grpc.RpcError as error:
        return error


def requests_counted(metrics: str, method: str, code: str, instance: str = "bge-small") -> float:
    """``teisup_requests_total`` of gRPC calls of ``method`` to ``instance`` ending ``code``."""
    pattern = re.compile(
        rf'^teisup_requests_total\{{(?=[^}}]*transport="grpc")(?=[^}}]*method="{method}")'
        rf'(?=[^}}]*instance="{instance}")(?=[^}}]*code="{code}")[^}}]*\}} (\S+)$',
        re.M,
    )
    return sum(float(m.group(1)) for m in pattern.finditer(metrics))


async def test_every_worker_routes_by_the_view_and_metrics_count_them_all(
    tmp_path: Path, mux_stubs: SimpleNamespace
) -> None:
    import grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    unknown_service = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    async with teisup(tmp_path, "grpc_max_message_size_mb = 1\n", env=ENV) as t:
        tree = (await t.http.get("/supervisor/tree")).json()
        ids = [c["id"] for c in tree["children"]]
        assert "grpc" not in ids
        assert [i for i in ids if i.startswith("grpc-worker-")] == [
            "grpc-worker-0",
            "grpc-worker-1",
        ]
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        pids = await wait_workers(t)

        def scenario() -> int:
            calls = 0
            with one_channel_per_worker(t, pids, insecure(t.grpc_port), health_check) as chosen:
                for channel in chosen.values():
                    watch_until(channel, "bge-small", serving)
                    answer = info(mux_stubs, channel)
                    assert answer.model_id == SMALL["model_id"], answer
                    calls += 1
                    too_big = embed(mux_stubs, channel, "x" * (1024 * 1024 + 1))
                    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, too_big
                return calls

        ok_calls = await trio.to_thread.run_sync(scenario)
        assert ok_calls == WORKERS

        # Stopped: every worker refuses it; started again: every worker routes to it.
        assert (await t.http.post("/instances/bge-small/stop")).status_code == 200
        await wait_state(t, "bge-small", "stopped")

        def stopped() -> None:
            with one_channel_per_worker(t, pids, insecure(t.grpc_port), health_check) as chosen:
                for channel in chosen.values():
                    watch_until(channel, "bge-small", not_serving)
                    refused = info(mux_stubs, channel)
                    assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
                    assert "is not running" in refused.details()

        await trio.to_thread.run_sync(stopped)
        assert (await t.http.post("/instances/bge-small/start")).status_code == 200
        await wait_state(t, "bge-small", "running")
        ok_calls += await trio.to_thread.run_sync(scenario)

        # Deleted: every worker forgets it (no transition says so; the manager tells them).
        assert (await t.http.post("/instances/bge-small/stop")).status_code == 200
        await wait_state(t, "bge-small", "stopped")
        assert (await t.http.delete("/instances/bge-small")).status_code == 204

        def deleted() -> None:
            with one_channel_per_worker(t, pids, insecure(t.grpc_port), health_check) as chosen:
                for channel in chosen.values():
                    watch_until(channel, "bge-small", unknown_service)
                    unknown = info(mux_stubs, channel)
                    assert unknown.code() == grpc.StatusCode.NOT_FOUND, unknown
                    assert unknown.details() == "Instance 'bge-small' not found"

        await trio.to_thread.run_sync(deleted)

        # /metrics counts the calls every worker served.
        with trio.fail_after(30):
            while True:
                metrics = (await t.http.get("/metrics")).text
                if requests_counted(metrics, "Info", "OK") >= ok_calls:
                    break
                await trio.sleep(0.05)
        assert requests_counted(metrics, "Info", "OK") == ok_calls
        # Refused because it was stopped: counted against the instance it named.
        assert requests_counted(metrics, "Info", "UNAVAILABLE") >= WORKERS
        assert await t.stop() == 0


async def test_a_worker_killed_with_sigkill_is_replaced_and_the_port_keeps_serving(
    tmp_path: Path,
) -> None:
    async with teisup(tmp_path, env=ENV) as t:
        pids = await wait_workers(t)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            await wait_gone(victim)

        def the_port_serves() -> None:
            # The survivor holds the port alone until the replacement binds.
            channel = insecure(t.grpc_port)()
            try:
                answer = health_check(channel)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, answer
            finally:
                channel.close()

        for _ in range(8):
            await trio.to_thread.run_sync(the_port_serves)
        replaced = await wait_workers(t, not_pids=frozenset({victim}))
        await t.wait_log("gRPC worker 0 exited (killed by SIGKILL)")
        assert replaced[1] == pids[1]

        def every_worker_serves() -> None:
            with one_channel_per_worker(t, replaced, insecure(t.grpc_port), health_check) as chosen:
                for channel in chosen.values():
                    assert health_check(channel).status == health_pb2.HealthCheckResponse.SERVING

        await trio.to_thread.run_sync(every_worker_serves)
        tree = (await t.http.get("/supervisor/tree")).json()
        [worker] = [c for c in tree["children"] if c["id"] == "grpc-worker-0"]
        assert worker["state"] == "running"
        assert worker["restarts_in_window"] >= 1
        assert await t.stop() == 0


async def test_kill_9_of_the_manager_leaves_no_worker_behind(tmp_path: Path) -> None:
    async with teisup(tmp_path, env=ENV) as t:
        pids = await wait_workers(t)
        t.proc.kill()
        await t.proc.wait()
        with trio.fail_after(30):
            for pid in pids.values():
                await wait_gone(pid)


async def test_mtls_and_the_token_refuse_the_same_calls_in_every_worker(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
    mux_stubs: SimpleNamespace,
) -> None:
    import grpc

    from ..security.test_mtls import https

    client = {"verify": https(pki, pki.allowed), "headers": {"Authorization": f"Bearer {TOKEN}"}}
    async with teisup(
        tmp_path, MTLS_CONFIG, env={**mtls_env(pki), **ENV}, scheme="https", client=client
    ) as t:
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        pids = await wait_workers(t)

        def secure(leaf: trustme.LeafCert) -> Callable[[], Any]:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pki.ca.cert_pem.bytes(),
                private_key=leaf.private_key_pem.bytes(),
                certificate_chain=b"".join(p.bytes() for p in leaf.cert_chain_pems),
            )
            options = [("grpc.use_local_subchannel_pool", 1)]
            return lambda: grpc.secure_channel(f"127.0.0.1:{t.grpc_port}", credentials, options)

        def scenario() -> None:
            with one_channel_per_worker(t, pids, secure(pki.allowed), health_check) as chosen:
                for channel in chosen.values():
                    watch_until(channel, "bge-small", health_pb2.HealthCheckResponse.SERVING)
                    assert info(mux_stubs, channel, TOKEN).model_id == SMALL["model_id"]
                    for token in (None, "wrong"):
                        refused = info(mux_stubs, channel, token)
                        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused
            with one_channel_per_worker(t, pids, secure(pki.outsider), health_check) as chosen:
                for channel in chosen.values():
                    denied = info(mux_stubs, channel, TOKEN)
                    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED, denied
                    assert "other-client" in denied.details()
                    assert health_check(channel).code() == grpc.StatusCode.PERMISSION_DENIED

        await trio.to_thread.run_sync(scenario)
        assert await t.stop() == 0


async def test_a_second_teisup_cannot_share_the_workers_port(tmp_path: Path) -> None:
    # SO_REUSEPORT would let it: the port is checked with a plain bind first.
    async with teisup(tmp_path, env=ENV) as first:
        await wait_workers(first)
        argv = [
            sys.executable, "-m", "teisup", "--api-port", str(free_port()),
            "--grpc-port", str(first.grpc_port), "--state-file", str(tmp_path / "second.toml"),
        ]  # fmt: skip
        env = {**os.environ, **ENV, "TEISUP_BIND_HOST": "127.0.0.1"}
        env["TEISUP_DEFAULT_INSTANCE"] = "false"
        with trio.fail_after(60):
            second = await trio.run_process(argv, env=env, capture_stderr=True, check=False)
        assert second.returncode != 0
        assert b"Address already in use" in second.stderr
        assert await first.stop() == 0


async def test_sighup_reloads_the_certificate_in_every_worker(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    import ssl

    from cryptography import x509

    from ..security.test_mtls import https
    from ..security.test_tls import server_files

    env = {**mtls_env(pki), **ENV}
    client = {"verify": https(pki, pki.allowed), "headers": {"Authorization": f"Bearer {TOKEN}"}}
    async with teisup(tmp_path, env=env, scheme="https", client=client) as t:
        pids = await wait_workers(t)

        def tls_connect() -> ssl.SSLSocket:
            context = https(pki, pki.allowed)
            context.set_alpn_protocols(["h2"])
            raw = socket.create_connection(("127.0.0.1", t.grpc_port), timeout=10)
            return context.wrap_socket(raw, server_hostname="127.0.0.1")

        def serials() -> set[int]:
            seen = set()
            with one_channel_per_worker(t, pids, tls_connect, lambda _: None) as chosen:
                for tls in chosen.values():
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    seen.add(int(x509.load_der_x509_certificate(der).serial_number))
            return seen

        [old] = await trio.to_thread.run_sync(serials)
        server_files(pki.ca, tmp_path)  # the same names, a new certificate
        t.proc.send_signal(signal.SIGHUP)
        for index in pids:
            await t.wait_log(
                f"worker {index}: teisup.grpc.worker: SIGHUP: TLS certificate reloaded"
            )
        [new] = await trio.to_thread.run_sync(serials)
        assert new != old
        assert await t.stop() == 0


def test_grpc_workers_defaults_to_the_cpus_at_most_8_and_reads_env_and_flag() -> None:
    from teisup.service import ConfigError, load_config

    cpus = len(os.sched_getaffinity(0))
    assert load_config(environ={}).grpc_workers == min(cpus, 8)
    assert load_config(environ={"TEISUP_GRPC_WORKERS": "3"}).grpc_workers == 3
    assert load_config(environ={}, overrides={"grpc_workers": 1}).grpc_workers == 1
    for value in ("9", "0", "two"):
        with pytest.raises(ConfigError, match="TEISUP_GRPC_WORKERS"):
            load_config(environ={"TEISUP_GRPC_WORKERS": value})


def test_a_bad_grpc_workers_flag_is_refused_naming_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "teisup", "--grpc-workers", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "flag --grpc-workers" in done.stderr
