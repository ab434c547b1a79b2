"""A manager of real processes: the TEI test double under real supervision."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from teisup.instances import (
    FakeNvml,
    HealthSettings,
    InstanceManager,
    PortAllocator,
    ProcessSpawner,
)
from teisup.instances.probe import grpc_health_probe

FAKE_TEI = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_tei.py")]

#: Probing fast enough that fault tests take seconds, not minutes.
QUICK_HEALTH = HealthSettings(
    interval=0.2, timeout=0.5, failure_threshold=2, ready_poll_interval=0.05
)


@asynccontextmanager
async def running_manager(
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    manager_id: str | None = None,
    gpus: FakeNvml | None = None,
) -> AsyncIterator[InstanceManager]:
    async with ProcessSpawner() as spawner:
        manager = InstanceManager(
            launcher=FAKE_TEI,
            manager_id=manager_id or f"test-{uuid.uuid4()}",
            spawner=spawner,
            ports=PortAllocator(),
            gpus=gpus or FakeNvml([]),
            probe=grpc_health_probe,
            health=QUICK_HEALTH,
            log_dir=log_dir,
            base_env={**os.environ, **(env or {})},
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.supervisor.run)
            try:
                yield manager
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await manager.supervisor.stop()
                manager.close()


async def wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (its pidfd turns readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
