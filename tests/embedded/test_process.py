"""The embedded backend as a process: exit codes, Ready, SIGTERM, and under the manager."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from teisup.instances import (
    FakeNvml,
    HealthSettings,
    InstanceManager,
    InstanceSpec,
    PortAllocator,
    ProcessSpawner,
)
from teisup.instances.probe import grpc_health_probe
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import call_once
from teisup.supervision import ChildState

from ..supervision.helpers import wait_for
from .conftest import MINILM, ROOT, ServerProcess, free_port, needs_minilm

EMBEDDED = [sys.executable, "-m", "teisup.embedded"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBEDDED, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_malformed_flags_exit_2() -> None:
    done = run("--model-id", "x", "--port", "not-a-port")
    assert done.returncode == 2
    assert "usage: text-embeddings-router" in done.stderr
    assert run("--model-id", "x", "--auto-truncate", "maybe").returncode == 2
    no_model = run()
    assert no_model.returncode == 2  # --model-id is required since TEI 1.9.0
    assert "--model-id" in no_model.stderr
    assert run(env={"JSON_OUTPUT": "yes", "MODEL_ID": "x"}).returncode == 2


def test_unknown_model_exits_1_at_once(tmp_path: Path) -> None:
    done = run("--model-id", "org/does-not-exist", env={"HF_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.startswith("Error: Could not download model artifacts")
    assert "not available offline" in done.stderr
    assert str(tmp_path / "hub") in done.stderr
    assert "Ready" not in done.stdout


@pytest.mark.slow
def test_port_taken_exits_1_and_sigterm_exits_0(tiny_models: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(
            "--model-id", str(tiny_models["dense"]), "--hostname", "127.0.0.1",
            "--port", str(port), "--prometheus-port", "0",
        )  # fmt: skip
    assert done.returncode == 1
    assert f"Error: Could not bind TCP Listener on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "Ready" not in done.stdout

    server = ServerProcess("--model-id", str(tiny_models["dense"]))
    server.wait_ready()
    code, out, err = server.stop()
    assert code == 0, err
    assert "signal received, starting graceful shutdown" in out


@pytest.mark.slow
@needs_minilm
async def test_the_manager_runs_it_end_to_end(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with ProcessSpawner() as spawner:
            manager = InstanceManager(
                launcher=EMBEDDED,
                manager_id=f"test-{uuid.uuid4()}",
                spawner=spawner,
                ports=PortAllocator(),
                gpus=FakeNvml([]),
                probe=grpc_health_probe,
                health=HealthSettings(interval=1.0, timeout=5.0, ready_poll_interval=0.5),
                log_dir=tmp_path,
                base_env=dict(os.environ),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.supervisor.run)
                try:
                    with manager.supervisor.events.subscribe() as events:
                        # Explicit free ports: other suites may run TEI doubles on 8080+.
                        spec = InstanceSpec(
                            name="minilm",
                            model_id=MINILM,
                            max_batch_tokens=2048,
                            port=free_port(),
                            prometheus_port=free_port(),
                        )
                        await manager.create(spec)
                        await wait_for(events, "minilm", ChildState.RUNNING)
                    info = manager.get("minilm")
                    about = await call_once(
                        "127.0.0.1",
                        info.port,
                        lambda ch: tei_grpc.InfoStub(ch).Info(tei_pb2.InfoRequest()),
                        timeout=30,
                    )
                    assert (about.model_id, about.max_batch_tokens) == (MINILM, 2048)
                    request = tei_pb2.EmbedRequest(inputs="supervised embeddings", normalize=True)
                    answer = await call_once(
                        "127.0.0.1",
                        info.port,
                        lambda ch: tei_grpc.EmbedStub(ch).Embed(request),
                        timeout=30,
                    )
                    assert len(answer.embeddings) == 384
                    stopped = await manager.stop("minilm")
                    assert stopped.status == ChildState.STOPPED
                    assert stopped.last_exit is not None
                    assert stopped.last_exit.kind.value == "shutdown"
                    assert any(line.message == "Ready" for line in manager.logs("minilm"))
                finally:
                    with trio.CancelScope(shield=True):
                        await manager.supervisor.stop()
                    manager.close()
