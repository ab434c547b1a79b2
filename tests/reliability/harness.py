"""A real ``teisup`` process for the reliability suite, and what an operator looks at.

`teisup` starts ``python -m teisup`` on free ports (REST and gRPC), with
``TEI_BINARY_PATH`` pointing at a router script that runs ``tests/fake_tei.py``.
Before exec'ing the fake, the script sources ``knobs/<instance>.env`` under the
test's directory if there is one (the instance's name comes from the
``TEISUP_INSTANCE`` marker the manager gives every child), so each instance of
one manager gets its own ``FAKE_TEI_*`` behaviour, and a test can change it
between two runs of the same instance. `Teisup.knobs` writes that file.

Instance and Prometheus ports come from a block of 64 picked at random below
the kernel's ephemeral range, not from the default 8080-8179 and 9100-9199:
another teisup (another test run on the same machine) may hold those, and
an instance answered by another's process is a fault of its own (issue 11
item 4) that only its own test should meet. No test expects a particular
port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from teisup.instances.process import proc_state

from ..ports import free_port, private_port_block, with_private_ports

FAKE_TEI = Path(__file__).resolve().parents[1] / "fake_tei.py"

ROUTER = """#!/bin/sh
knobs="{knobs}/$TEISUP_INSTANCE.env"
if [ -n "$TEISUP_INSTANCE" ] && [ -f "$knobs" ]; then
    set -a
    . "$knobs"
    set +a
fi
exec "{python}" "{fake}" "$@"
"""

FAKE = {"model_id": "BAAI/bge-small-en-v1.5"}
"""The model every fake instance claims to serve, unless a test names another."""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: ``kill -0`` would say it does)."""
    return proc_state(pid) not in (None, "Z")


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


class Teisup:
    """A running ``teisup`` process, an HTTP client for it, and its log."""

    def __init__(self, proc: trio.Process, port: int, grpc_port: int, root: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_port = grpc_port
        self.root = root
        self.log: list[str] = []
        #: Set (and replaced) whenever a line is added to `log`.
        self.logged = trio.Event()
        self.http = httpx.AsyncClient(base_url=self.url, timeout=60)

    def knobs(self, instance: str, **env: str | float) -> None:
        """Give ``instance``'s next runs these ``FAKE_TEI_*`` variables (none: plain)."""
        lines = "".join(f"{key}={value}\n" for key, value in env.items())
        (self.root / "knobs" / f"{instance}.env").write_text(lines)

    def added(self) -> None:
        self.logged.set()
        self.logged = trio.Event()

    async def wait_log(self, text: str, *, after: int = 0, timeout: float = 60) -> str:  # noqa: ASYNC109
        """The first log line from index ``after`` on that contains ``text``."""
        with trio.fail_after(timeout):
            while True:
                found = next((line for line in self.log[after:] if text in line), None)
                if found is not None:
                    return found
                if self.proc.returncode is not None:
                    raise AssertionError(f"teisup exited before logging {text!r}")
                await self.logged.wait()

    async def create(self, name: str, **spec: Any) -> dict[str, Any]:
        """POST /instances (the fake's model unless given); asserts 201."""
        response = await self.http.post("/instances", json={"name": name, **FAKE, **spec})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def get(self, name: str) -> dict[str, Any]:
        response = await self.http.get(f"/instances/{name}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:  # noqa: ASYNC109
        """``GET /instances/{name}?wait=state``: the instance once it is in ``state``."""
        response = await self.http.get(
            f"/instances/{name}", params={"wait": state, "timeout": timeout}
        )
        assert response.status_code == 200, (state, response.text)
        body: dict[str, Any] = response.json()
        return body

    async def post(self, path: str) -> dict[str, Any]:
        response = await self.http.post(path)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def stop(self) -> int:
        """SIGTERM, and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(120):
            return await self.proc.wait()


@asynccontextmanager
async def teisup(
    root: Path,
    config: str = "",
    env: dict[str, str] | None = None,
    *,
    state_file: Path | None = None,
) -> AsyncIterator[Teisup]:
    """Run ``teisup`` in ``root`` until the block ends (SIGTERM; SIGKILL if it hangs).

    Running it again on the same ``root`` keeps the state file, so a second
    block is the same manager restarted.
    """
    knobs = root / "knobs"
    knobs.mkdir(exist_ok=True)
    router = root / "text-embeddings-router"
    router.write_text(ROUTER.format(knobs=knobs, python=sys.executable, fake=FAKE_TEI))
    router.chmod(0o755)
    (root / "teisup.toml").write_text(with_private_ports(config, private_port_block()))
    port, grpc_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "teisup", "-c", str(root / "teisup.toml"),
        "--api-port", str(port), "--grpc-port", str(grpc_port),
        "--state-file", str(state_file or root / "state.toml"),
    ]  # fmt: skip
    child_env = {
        **os.environ,
        "TEI_BINARY_PATH": str(router),
        "TEISUP_BIND_HOST": "127.0.0.1",
        "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "0.5",
        **(env or {}),
    }
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, env=child_env, stderr=subprocess.PIPE, check=False)
        )
        running = Teisup(proc, port, grpc_port, root)
        listening = trio.Event()

        async def pump() -> None:
            assert proc.stderr is not None
            buffer = b""
            while chunk := await proc.stderr.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    running.log.append(line.decode(errors="replace"))
                    if "REST API listening on" in running.log[-1]:
                        listening.set()
                running.added()
            listening.set()  # it exited: let the waiter see that
            running.added()

        nursery.start_soon(pump)
        with trio.fail_after(60):
            await listening.wait()
        assert proc.returncode is None, "\n".join(running.log)
        try:
            yield running
        except BaseException:
            # What the manager said is the first thing to read when a test fails.
            print("\n".join(["teisup's log, last lines:", *running.log[-60:]]), file=sys.stderr)
            raise
        finally:
            await running.http.aclose()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(120):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
