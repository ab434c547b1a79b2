"""Exit-to-restart latency: from a crashed instance's exit to its next spawn.

Runs the real instances layer (InstanceManager, InstanceRunner, the supervisor,
the spawner thread) on a child that prints ``time.monotonic()`` as its very
last act and exits 1, with no backoff due (``Backoff(initial=0)``), and records
``time.monotonic()`` when each next spawn returns. Both clocks are the
system's CLOCK_MONOTONIC, so the difference is the decision latency: exit
noticed (through the subreaper shim, which reaps the child and exits alike),
restart decided, process forked. Target: under 50 ms. ``--no-shim`` runs the
child directly, to see what the shim costs.

    python benchmarks/restart_latency.py [--restarts 50] [--no-shim]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence

import trio

from teisup.instances import (
    FakeNvml,
    InstanceManager,
    InstanceSpec,
    PortAllocator,
    ProcessSpawner,
    RestartPolicy,
)
from teisup.supervision import Backoff, ChildState

CRASHER = "import sys, time; print(time.monotonic(), flush=True); sys.exit(1)"


class TimedSpawner(ProcessSpawner):
    """The real spawner, noting when each spawn has returned."""

    def __init__(self, *, shim: bool) -> None:
        super().__init__(shim=shim)
        self.spawned_at: list[float] = []

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None
    ) -> subprocess.Popen[bytes]:
        process = await super().spawn(argv, env, cwd)
        self.spawned_at.append(time.monotonic())
        return process


async def never_ready(host: str, port: int, timeout: float) -> str | None:  # noqa: ASYNC109
    return "not probed in this benchmark"


async def main(restarts: int, shim: bool) -> None:
    policy = RestartPolicy(max_restarts=restarts + 10, backoff=Backoff(initial=0.0))
    with tempfile.TemporaryDirectory() as log_dir:
        async with TimedSpawner(shim=shim) as spawner:
            manager = InstanceManager(
                launcher=[sys.executable, "-c", CRASHER],
                manager_id=f"bench-{uuid.uuid4()}",
                spawner=spawner,
                ports=PortAllocator(),
                gpus=FakeNvml([]),
                probe=never_ready,
                log_dir=log_dir,
                base_env=os.environ,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.supervisor.run)
                with manager.supervisor.events.subscribe() as events:
                    await manager.create(InstanceSpec(name="crasher", model_id="m", restart=policy))
                    seen = 0
                    async for event in events:
                        if event.new is ChildState.STARTING:
                            seen += 1
                            if seen > restarts:
                                break
                await manager.supervisor.stop()
                manager.close()
                exits = [
                    float(line.text)
                    for line in manager.logs("crasher", 0, None)
                    if line.text.replace(".", "", 1).isdigit()
                ]
    pairs = list(zip(exits, spawner.spawned_at[1:], strict=False))
    latencies = sorted((spawned - exited) * 1000 for exited, spawned in pairs)
    print(f"restarts measured: {len(latencies)}")
    print(
        f"exit -> next spawn (ms): median {statistics.median(latencies):.1f}, "
        f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.1f}, max {latencies[-1]:.1f}"
    )
    print(f"target: under 50 ms -> median/target = {statistics.median(latencies) / 50:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--no-shim", action="store_true", help="run the child without the shim")
    args = parser.parse_args()
    trio.run(main, args.restarts, not args.no_shim)
