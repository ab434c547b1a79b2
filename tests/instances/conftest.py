"""A manager of real processes: the TEI test double under real supervision."""

from __future__ import annotations

import os
import random
import socket
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
    PortRange,
    ProcessSpawner,
)
from teisup.instances.identity import PortOwnerCheck, proc_port_owner
from teisup.instances.probe import grpc_health_probe
from teisup.instances.runner import PhaseListener

FAKE_TEI = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_tei.py")]

#: Probing fast enough that fault tests take seconds, not minutes.
QUICK_HEALTH = HealthSettings(
    interval=0.2, timeout=0.5, failure_threshold=2, ready_poll_interval=0.05
)


def port_ranges() -> tuple[PortRange, PortRange]:
    """A random window of 100 instance and 100 Prometheus ports below the
    ephemeral range, so that suites running at once (each starting instances)
    rarely reach for the same port; the allocator skips any that is taken."""
    offset = 100 * random.randrange(60)
    return PortRange(20000 + offset, 20099 + offset), PortRange(26000 + offset, 26099 + offset)


@asynccontextmanager
async def running_manager(
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    manager_id: str | None = None,
    gpus: FakeNvml | None = None,
    port_owner: PortOwnerCheck = proc_port_owner,
    supervise: bool = True,
    launcher: list[str] | None = None,
    on_phase: PhaseListener | None = None,
) -> AsyncIterator[InstanceManager]:
    """A manager of the TEI double; ``supervise=False`` leaves running its
    supervisor (in a tree of the test's own) to the test."""
    instance_ports, prometheus_ports = port_ranges()
    async with ProcessSpawner() as spawner:
        manager = InstanceManager(
            launcher=launcher or FAKE_TEI,
            manager_id=manager_id or f"test-{uuid.uuid4()}",
            spawner=spawner,
            ports=PortAllocator(instance_ports=instance_ports, prometheus_ports=prometheus_ports),
            gpus=gpus or FakeNvml([]),
            probe=grpc_health_probe,
            health=QUICK_HEALTH,
            log_dir=log_dir,
            base_env={**os.environ, **(env or {})},
            port_owner=port_owner,
            on_phase=on_phase,
        )
        async with trio.open_nursery() as nursery:
            if supervise:
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


def free_ports(count: int) -> list[int]:
    """Ports the OS just handed out, away from the 8080-8179 range that other
    managers (and their tests) on this machine allocate from."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
