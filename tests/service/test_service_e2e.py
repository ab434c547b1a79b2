"""teisup as a user runs it: a real manager process, real HTTP, the TEI test double."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from teisup.instances.process import proc_state
from teisup.rpc import fetch_info

from ..ports import BLOCK, free_port, private_port_block, with_private_ports

FAKE_TEI = Path(__file__).resolve().parents[1] / "fake_tei.py"


class Teisup:
    """A running ``teisup`` process and an HTTP client for it."""

    def __init__(self, proc: trio.Process, url: str, log: list[str], **client: object) -> None:
        self.proc = proc
        self.url = url
        self.log = log
        #: Set (and replaced) whenever a line is added to `log`.
        self.logged = trio.Event()
        self.http = httpx.AsyncClient(base_url=url, timeout=30, **client)  # type: ignore[arg-type]
        self.grpc_port = 0
        #: The ports this manager allocates instance ports from.
        self.instance_ports = range(0)

    async def wait_log(self, text: str, timeout: float = 30) -> str:  # noqa: ASYNC109
        """The first log line containing ``text``, once it has been written."""
        with trio.fail_after(timeout):
            while True:
                found = next((line for line in self.log if text in line), None)
                if found is not None:
                    return found
                await self.logged.wait()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.proc.wait()


@asynccontextmanager
async def teisup(
    tmp_path: Path,
    config: str = "",
    env: dict[str, str] | None = None,
    state_file: Path | None = None,
    scheme: str = "http",
    client: dict[str, object] | None = None,
) -> AsyncIterator[Teisup]:
    router = tmp_path / "text-embeddings-router"
    router.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TEI}" "$@"\n')
    router.chmod(0o755)
    block = private_port_block()
    (tmp_path / "teisup.toml").write_text(with_private_ports(config, block))
    port, grpc_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "teisup", "-c", str(tmp_path / "teisup.toml"),
        "--api-port", str(port), "--grpc-port", str(grpc_port),
        "--state-file", str(state_file or tmp_path / "state.toml"),
    ]  # fmt: skip
    child_env = {
        **os.environ,
        "TEI_BINARY_PATH": str(router),
        "TEISUP_BIND_HOST": "127.0.0.1",
        "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "0.5",
        **(env or {}),
    }
    log: list[str] = []
    listening = trio.Event()
    watchers: list[Teisup] = []
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, env=child_env, stderr=subprocess.PIPE, check=False)
        )

        async def pump() -> None:
            assert proc.stderr is not None
            buffer = b""
            while chunk := await proc.stderr.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    log.append(line.decode(errors="replace"))
                    if "REST API listening on" in log[-1]:
                        listening.set()
                for watcher in watchers:
                    watcher.logged.set()
                    watcher.logged = trio.Event()
            listening.set()  # exited: let the waiter see it

        nursery.start_soon(pump)
        with trio.fail_after(30):
            await listening.wait()
        assert proc.returncode is None, "\n".join(log)
        running = Teisup(proc, f"{scheme}://127.0.0.1:{port}", log, **(client or {}))
        running.grpc_port = grpc_port
        running.instance_ports = range(block.start, block.start + BLOCK)
        watchers.append(running)
        try:
            yield running
        finally:
            await running.http.aclose()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                await proc.wait()


async def status_of_announced_body(
    url: str, path: str, length: int, headers: dict[str, str] | None = None
) -> int:
    """POST announcing a ``length``-byte body, send none of it, return the status.

    A server must refuse an over-size body from its Content-Length alone. (And
    an HTTP client still sending when refused leaves its body generator
    unclosed, which this suite's warnings filter turns into an error.)
    """
    port = int(url.rsplit(":", 1)[1])
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {length}\r\n\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head.encode())
        with trio.fail_after(30):
            answer = await stream.receive_some()
    return int(answer.split(b" ", 2)[1])


SMALL = {"name": "bge-small", "model_id": "BAAI/bge-small-en-v1.5"}


# Generous: a real model loads in seconds on a quiet machine, in a minute or
# more when other suites share its two cores; only a hang should fail here.
WAIT_STATE_SECONDS = 120


async def wait_state(t: Teisup, name: str, state: str) -> dict[str, object]:
    response = await t.http.get(
        f"/instances/{name}",
        params={"wait": state, "timeout": WAIT_STATE_SECONDS},
        timeout=WAIT_STATE_SECONDS + 10,
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_every_route_through_real_http(tmp_path: Path) -> None:
    async with teisup(tmp_path) as t:
        http = t.http
        assert (await http.get("/health")).json()["status"] == "healthy"

        created = await http.post("/instances", json=SMALL)
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["status"]) == ("bge-small", "starting")
        running = await wait_state(t, "bge-small", "running")
        # tei-manager's status and whole-second uptime, teisup's finer ones beside.
        assert (running["status"], running["state"]) == ("running", "running")
        assert isinstance(running["uptime_secs"], int), running
        assert isinstance(running["uptime_seconds"], float), running
        assert running["uptime_secs"] == int(running["uptime_seconds"])
        # A port of the configured instance range (another teisup may hold
        # 8080-8180), never the manager's own, and the instance's own process
        # answers there.
        manager_ports = (int(t.url.rsplit(":", 1)[1]), t.grpc_port)
        for port in (body["port"], running["port"]):
            assert isinstance(port, int)
            assert port in t.instance_ports
            assert port not in manager_ports
        port = running["port"]
        assert isinstance(port, int)
        assert (await fetch_info("127.0.0.1", port, timeout=5)).model_id == SMALL["model_id"]
        pid = running["pid"]
        assert isinstance(pid, int)
        assert proc_state(pid) not in (None, "Z")

        listing = (await http.get("/instances")).json()
        assert [i["name"] for i in listing] == ["bge-small"]
        assert listing[0]["spec"]["model_id"] == "BAAI/bge-small-en-v1.5"

        # start is idempotent: no second process
        again = await http.post("/instances/bge-small/start")
        assert (again.status_code, again.json()["pid"]) == (200, pid)

        stopped = await http.post("/instances/bge-small/stop")
        assert (stopped.status_code, stopped.json()["status"]) == (200, "stopped")
        assert (stopped.json()["uptime_secs"], stopped.json()["uptime_seconds"]) == (0, None)
        assert proc_state(pid) is None
        assert (await http.post("/instances/bge-small/stop")).json()["status"] == "stopped"

        assert (await http.post("/instances/bge-small/start")).status_code == 200
        await wait_state(t, "bge-small", "running")
        restarted = await http.post("/instances/bge-small/restart")
        assert restarted.status_code == 200
        await wait_state(t, "bge-small", "running")

        logs = (await http.get("/instances/bge-small/logs", params={"tail": 3})).json()
        assert len(logs["lines"]) == 3
        assert logs["total_lines"] >= 3
        # tei-manager's form: each line once, as the log file holds it (TEI's JSON).
        assert all(isinstance(line, str) for line in logs["lines"])
        assert json.loads(logs["lines"][-1])["message"] == "Ready"
        parsed = await http.get("/instances/bge-small/logs", params={"tail": 3, "format": "parsed"})
        last = parsed.json()["lines"][-1]
        assert (last["message"], last["level"], last["stream"]) == ("Ready", "INFO", "stdout")
        assert "text" not in last
        bad = await http.get("/instances/bge-small/logs", params={"format": "xml"})
        assert (bad.status_code, bad.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "format must be text or parsed" in bad.json()["error"]
        # tei-manager's start and end are integers; anything else is its 400.
        bad_end = await http.get("/instances/bge-small/logs", params={"end": "x"})
        assert (bad_end.status_code, bad_end.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "end" in bad_end.json()["error"]
        health = (await http.get("/instances/bge-small/health")).json()
        assert health["probe"]["ok"] is True
        aggregate = (await http.get("/health")).json()["instances"]
        assert (aggregate["status"], aggregate["running"]) == ("healthy", 1)
        assert (await http.get("/gpus")).json() == []

        tree = (await http.get("/supervisor/tree")).json()
        assert tree["id"] == "root"
        instances = next(c for c in tree["children"] if c["id"] == "instances")
        assert [c["id"] for c in instances["children"]] == ["bge-small"]
        assert instances["children"][0]["state"] == "running"

        metrics = (await http.get("/metrics")).text
        created_series = (
            'tei_manager_instances_created_total{instance="bge-small",'
            'model="BAAI/bge-small-en-v1.5"} 1.0'
        )
        assert created_series in metrics
        assert 'teisup_instance_state{instance="bge-small",state="running"} 1.0' in metrics
        assert "teisup_state_write_duration_seconds_count" in metrics

        spec = (await http.get("/openapi.json")).json()
        assert "/instances/{name}/restart" in spec["paths"]
        assert "InstanceSpec" in spec["components"]["schemas"]

        deleted = await http.delete("/instances/bge-small")
        assert (deleted.status_code, deleted.content) == (204, b"")
        missing = await http.get("/instances/bge-small")
        assert missing.status_code == 404
        assert missing.json()["code"] == "INSTANCE_NOT_FOUND"
        assert (
            'tei_manager_instances_deleted_total{instance="bge-small"} 1.0'
            in (await http.get("/metrics")).text
        )
        assert await t.stop() == 0


async def test_bad_requests_get_honest_statuses_and_change_nothing(tmp_path: Path) -> None:
    async with teisup(tmp_path, config="max_instances = 2\n") as t:
        http = t.http
        assert (await http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        state_before = (tmp_path / "state.toml").read_bytes()

        malformed = await http.post(
            "/instances", content=b'{"name": ', headers={"content-type": "application/json"}
        )
        assert (malformed.status_code, malformed.json()["code"]) == (400, "INVALID_JSON")
        # tei-manager's statuses and codes; teisup's finer one as "reason".
        missing = await http.post("/instances", json={"name": "x"})
        assert (missing.status_code, missing.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "model_id" in missing.json()["error"]
        bad_port = await http.post("/instances", json={**SMALL, "name": "y", "port": 70000})
        assert (bad_port.status_code, bad_port.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "$.port" in bad_port.json()["error"]
        owned = await http.post(
            "/instances",
            json={**SMALL, "name": "z", "extra_args": ["--port", "1"]},
        )
        assert (owned.status_code, owned.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "extra_args" in owned.json()["error"]
        duplicate = await http.post("/instances", json=SMALL)
        assert (duplicate.status_code, duplicate.json()["code"]) == (400, "VALIDATION_ERROR")
        assert duplicate.json()["reason"] == "INSTANCE_EXISTS"
        assert "bge-small" in duplicate.json()["error"]
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            conflict = await http.post("/instances", json={**SMALL, "name": "b", "port": busy})
        assert (conflict.status_code, conflict.json()["reason"]) == (400, "PORT_CONFLICT")
        assert str(busy) in conflict.json()["error"]
        assert await status_of_announced_body(t.url, "/instances", 2 << 20) == 413
        unknown = await http.post("/instances/nope/start")
        assert (unknown.status_code, unknown.json()["code"]) == (404, "INSTANCE_NOT_FOUND")
        assert (await http.get("/no/such/route")).json()["code"] == "NOT_FOUND"
        bad_wait = await http.get("/instances/bge-small", params={"wait": "sleeping"})
        assert (bad_wait.status_code, bad_wait.json()["code"]) == (400, "VALIDATION_ERROR")
        assert "sleeping" in bad_wait.json()["error"]

        # Nothing above left half an instance behind or touched the snapshot.
        assert [i["name"] for i in (await http.get("/instances")).json()] == ["bge-small"]
        assert (tmp_path / "state.toml").read_bytes() == state_before

        # As a typed client of tei-manager sends it: every optional field null.
        optional = ("port", "max_batch_tokens", "max_concurrent_requests", "pooling", "gpu_id")
        optional += ("prometheus_port", "startup_timeout_secs", "extra_args")
        nulls = {**SMALL, "name": "second", **dict.fromkeys(optional)}
        second = await http.post("/instances", json=nulls)
        assert second.status_code == 201, second.text
        # Every null became the default, which the spec leaves out.
        assert second.json()["spec"] == {"name": "second", "model_id": SMALL["model_id"]}
        full = await http.post("/instances", json={**SMALL, "name": "third"})
        assert (full.status_code, full.json()["code"]) == (400, "VALIDATION_ERROR")
        assert full.json()["reason"] == "MAX_INSTANCES_REACHED"
        assert await t.stop() == 0


SEED = """\
[[instances]]
name = "seed"
model_id = "BAAI/bge-small-en-v1.5"
"""


async def test_sigterm_stops_everything_and_a_restart_restores_desired_states(
    tmp_path: Path,
) -> None:
    async with teisup(tmp_path, config=SEED) as t:
        await wait_state(t, "seed", "running")
        assert (await t.http.post("/instances", json={**SMALL, "name": "a"})).status_code == 201
        assert (await t.http.post("/instances", json={**SMALL, "name": "b"})).status_code == 201
        await wait_state(t, "a", "running")
        await wait_state(t, "b", "running")
        assert (await t.http.post("/instances/b/stop")).status_code == 200
        infos = (await t.http.get("/instances")).json()
        pids = [i["pid"] for i in infos if i["pid"]]
        assert len(pids) == 2
        assert await t.stop() == 0
    # Every child is gone; the final snapshot has every instance and its wish.
    assert all(proc_state(pid) is None for pid in pids)
    state = (tmp_path / "state.toml").read_text()
    assert 'name = "seed"' in state
    assert 'desired = "stopped"' in state  # b

    async with teisup(tmp_path, config=SEED) as t:
        await wait_state(t, "a", "running")
        await wait_state(t, "seed", "running")
        b = (await t.http.get("/instances/b")).json()
        assert (b["status"], b["desired"]) == ("stopped", "stopped")
        ports = {i["name"]: i["port"] for i in (await t.http.get("/instances")).json()}
        assert len(set(ports.values())) == 3
        assert await t.stop() == 0


async def test_a_corrupt_snapshot_starts_empty_and_is_kept_aside(tmp_path: Path) -> None:
    (tmp_path / "state.toml").write_text("[[instances]\nname = ")
    async with teisup(tmp_path) as t:
        assert (await t.http.get("/instances")).json() == []
        metrics = (await t.http.get("/metrics")).text
        assert 'teisup_state_restore_total{source="unreadable"} 1.0' in metrics
        assert await t.stop() == 0
    assert [p.name for p in await trio.Path(tmp_path).iterdir() if ".corrupt-" in p.name]
    assert any("state" in line and "corrupt" in line for line in t.log)


async def test_a_bad_config_is_refused_at_start_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("api_port = 9000\nhealth_check_interval = 5\n")
    result = await trio.run_process(
        [sys.executable, "-m", "teisup", "-c", str(tmp_path / "bad.toml")],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"line 2" in result.stderr
    assert b"health_check_interval" in result.stderr


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


async def test_a_read_only_state_directory_keeps_the_last_snapshot_and_retries(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state_dir)):
        pytest.skip("making a disk read-only needs mount (root with CAP_SYS_ADMIN)")
    state = state_dir / "state.toml"
    try:
        async with teisup(tmp_path, state_file=state) as t:
            assert (await t.http.post("/instances", json=SMALL)).status_code == 201
            before = state.read_bytes()
            assert _mount("-o", "remount,ro", str(state_dir))
            # The disk refuses the write: the call still answers, the failure is
            # counted and logged, and the last snapshot stays as it was.
            second = await t.http.post("/instances", json={**SMALL, "name": "second"})
            assert second.status_code == 201
            metrics = (await t.http.get("/metrics")).text
            assert "teisup_state_write_failures_total 0.0" not in metrics
            assert state.read_bytes() == before
            assert any("cannot write" in line for line in t.log)
            # The disk comes back: a retry writes the snapshot with both.
            assert _mount("-o", "remount,rw", str(state_dir))
            third = await t.http.post("/instances", json={**SMALL, "name": "third"})
            assert third.status_code == 201
            saved = state.read_text()
            assert 'name = "second"' in saved
            assert 'name = "third"' in saved
            assert await t.stop() == 0
    finally:
        _mount_umount(state_dir)


async def _wait_file(path: Path, done: Callable[[str], bool]) -> str:
    """The file's text once ``done`` holds for it (polled, bounded)."""
    with trio.fail_after(30):
        while True:
            text = await trio.Path(path).read_text()
            if done(text):
                return text
            await trio.sleep(0.05)


async def test_on_a_failing_disk_changes_answer_not_durable_and_land_with_no_further_request(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state_dir)):
        pytest.skip("making a disk read-only needs mount (root with CAP_SYS_ADMIN)")
    state = state_dir / "state.toml"
    config = f'log_dir = "{tmp_path / "logs"}"\n'
    try:
        async with teisup(tmp_path, config=config, state_file=state) as t:
            for name in ("keep", "gone"):
                made = await t.http.post("/instances", json={**SMALL, "name": name})
                assert made.status_code == 201
                assert made.headers["X-Teisup-Durable"] == "true"
                assert made.json()["durable"] is True
            assert (await t.http.get("/health")).json()["state"]["durable"] is True
            before = state.read_bytes()
            assert _mount("-o", "remount,ro", str(state_dir))

            # Applied, answered, and said to be not yet on disk.
            gone = await t.http.delete("/instances/gone")
            assert gone.status_code == 204
            assert gone.headers["X-Teisup-Durable"] == "false"
            new = await t.http.post("/instances", json={**SMALL, "name": "new"})
            assert new.status_code == 201
            assert new.headers["X-Teisup-Durable"] == "false"
            body = new.json()
            assert body.pop("durable") is False
            shown = (await t.http.get("/instances/new")).json()
            assert body.keys() == shown.keys()  # every tei-manager field, as it was
            stopped = await t.http.post("/instances/keep/stop")
            assert stopped.status_code == 200
            assert stopped.json()["durable"] is False
            health = await t.http.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "healthy"
            unsaved = health.json()["state"]
            assert unsaved["durable"] is False
            assert "Read-only" in unsaved["last_error"]
            assert unsaved["pending_since"] is not None
            metrics = (await t.http.get("/metrics")).text
            assert "teisup_state_durable 0.0" in metrics
            assert state.read_bytes() == before

            # The disk comes back: the writer's own retry saves it, nobody asks.
            assert _mount("-o", "remount,rw", str(state_dir))
            saved = await _wait_file(state, lambda text: 'name = "new"' in text)
            assert 'name = "gone"' not in saved
            assert 'desired = "stopped"' in saved  # keep
            health = (await t.http.get("/health")).json()
            assert health["state"]["durable"] is True
            assert "teisup_state_durable 1.0" in (await t.http.get("/metrics")).text
            t.proc.kill()
            await t.proc.wait()

        # After kill -9, exactly what was confirmed comes back.
        async with teisup(tmp_path, config=config, state_file=state) as t:
            infos = {i["name"]: i for i in (await t.http.get("/instances")).json()}
            assert sorted(infos) == ["keep", "new"]
            assert infos["keep"]["desired"] == "stopped"
            assert await t.stop() == 0
    finally:
        _mount_umount(state_dir)


def _mount_umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


TOKEN = "s3cret-token-for-tests-0123456789"


async def test_the_api_token_guards_every_route_that_changes_or_reveals_instances(
    tmp_path: Path,
) -> None:
    async with teisup(tmp_path, env={"TEISUP_API_TOKEN": TOKEN}) as t:
        http = t.http
        right = {"Authorization": f"Bearer {TOKEN}"}
        wrong = {"Authorization": "Bearer not-the-token-at-all-00000"}
        assert (await http.post("/instances", json=SMALL, headers=right)).status_code == 201
        routes = [
            ("GET", "/instances"),
            ("POST", "/instances"),
            ("GET", "/instances/bge-small"),
            ("POST", "/instances/bge-small/stop"),
            ("POST", "/instances/bge-small/start"),
            ("POST", "/instances/bge-small/restart"),
            ("GET", "/instances/bge-small/logs"),
            ("GET", "/instances/bge-small/health"),
            ("DELETE", "/instances/bge-small"),
            ("GET", "/supervisor/tree"),
            ("GET", "/gpus"),
            ("GET", "/openapi.json"),
            # The data plane.
            ("POST", "/instances/bge-small/embed"),
            ("POST", "/instances/bge-small/embed_sparse"),
            ("POST", "/instances/bge-small/rerank"),
            ("POST", "/instances/bge-small/tokenize"),
            ("POST", "/v1/embeddings"),
        ]
        for method, path in routes:
            for headers in ({}, wrong, {"Authorization": TOKEN}):
                response = await http.request(method, path, headers=headers, json=SMALL)
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["code"] == "UNAUTHENTICATED"
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await http.get("/instances", headers=right)).status_code == 200
        # The gRPC multiplexer wants it too, as metadata; health stays open.
        from teisup.proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
        from teisup.rpc import RpcStatusError, ServingStatus, call_once, check_health

        http.headers["Authorization"] = right["Authorization"]
        await wait_state(t, "bge-small", "running")
        del http.headers["Authorization"]
        request = multiplexer_pb2.InfoRequest(
            target=multiplexer_pb2.Target(instance_name="bge-small")
        )
        for metadata in (None, (("authorization", wrong["Authorization"]),)):

            async def refused(channel: Any, metadata: Any = metadata) -> Any:
                stub = multiplexer_grpc.TeiMultiplexerStub(channel)
                return await stub.Info(request, metadata=metadata)

            with pytest.raises(RpcStatusError) as caught:
                await call_once("127.0.0.1", t.grpc_port, refused, timeout=10)
            assert caught.value.code_name == "UNAUTHENTICATED"

        async def allowed(channel: Any) -> Any:
            stub = multiplexer_grpc.TeiMultiplexerStub(channel)
            return await stub.Info(request, metadata=(("authorization", right["Authorization"]),))

        info = await call_once("127.0.0.1", t.grpc_port, allowed, timeout=10)
        assert info.model_id == SMALL["model_id"]
        health = await check_health("127.0.0.1", t.grpc_port, service="bge-small", timeout=10)
        assert health is ServingStatus.SERVING
        # Probes and scrapers need no token; nothing logged the token.
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        assert await t.stop() == 0
    assert not any(TOKEN in line for line in t.log)


async def test_sighup_without_tls_is_harmless(tmp_path: Path) -> None:
    """SIGHUP's default action would end teisup abruptly: it is taken and noted."""
    async with teisup(tmp_path) as t:
        t.proc.send_signal(signal.SIGHUP)
        await t.wait_log("nothing to reload")
        assert (await t.http.get("/health")).status_code == 200
        assert await t.stop() == 0


async def test_an_open_api_on_a_network_address_is_loudly_warned_about(tmp_path: Path) -> None:
    async with teisup(tmp_path, env={"TEISUP_BIND_HOST": "0.0.0.0"}) as t:
        assert await t.stop() == 0
    assert any("with no API token" in line for line in t.log)


@pytest.mark.slow
async def test_a_bare_teisup_serves_the_embedded_default(tmp_path: Path) -> None:
    """The README's run command: no TEI binary, nothing configured."""
    env = {"TEI_BINARY_PATH": "", "PATH": os.defpath}
    async with teisup(tmp_path, env=env) as t:
        minilm = await wait_state(t, "minilm", "running")
        assert minilm["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
        port = minilm["port"]
        assert isinstance(port, int)
        info = await fetch_info("127.0.0.1", port, timeout=10)
        assert (info.model_id, info.max_input_length) == (minilm["model_id"], 256)
        assert await t.stop() == 0
    assert any("TEI binary" in line and "embedded backend" in line for line in t.log)


async def test_the_multiplexer_serves_as_a_child_of_the_service(tmp_path: Path) -> None:
    from teisup.proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
    from teisup.rpc import call_once

    async with teisup(tmp_path) as t:
        await t.http.post("/instances", json=SMALL)
        await wait_state(t, "bge-small", "running")
        tree = (await t.http.get("/supervisor/tree")).json()
        ids = [c["id"] for c in tree["children"]]
        # After the pool it uses and the API, so it stops before them.
        assert ids.index("backends") < ids.index("api") < ids.index("grpc")

        async def info(channel: object) -> object:
            stub = multiplexer_grpc.TeiMultiplexerStub(channel)
            target = multiplexer_pb2.Target(instance_name="bge-small")
            return await stub.Info(multiplexer_pb2.InfoRequest(target=target))

        answer = await call_once("127.0.0.1", t.grpc_port, info, timeout=10)  # type: ignore[arg-type]
        assert answer.model_id == "BAAI/bge-small-en-v1.5"  # type: ignore[attr-defined]
        assert await t.stop() == 0
