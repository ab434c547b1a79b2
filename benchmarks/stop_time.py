"""Shutdown time of the instances supervisor: N instances that ignore SIGTERM.

Runs the real instances layer (InstanceManager, InstanceRunner, the supervisor,
the spawner) on N children that ignore SIGTERM and then connect back to the
benchmark to say so, each with the same ``stop_grace_secs``, and times ``supervisor.stop()``: every
instance gets SIGTERM, its grace, then SIGKILL. The instances supervisor stops
its children in parallel, so the whole stop should take about one grace, not
N of them. Target: under 1.5 x the grace.

    python benchmarks/stop_time.py [--instances 5] [--grace 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

import trio

from teisup.instances import FakeNvml, InstanceManager, InstanceSpec, PortAllocator, ProcessSpawner

STUBBORN = (
    "import os, signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "s = socket.create_connection(('127.0.0.1', int(os.environ['BENCH_READY_PORT']))); "
    "time.sleep(10**6)"
)


async def never_ready(host: str, port: int, timeout: float) -> str | None:  # noqa: ASYNC109
    return "not probed in this benchmark"


async def main(instances: int, grace: float) -> None:
    names = [f"stubborn-{n}" for n in range(instances)]
    [ready] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ready_port = ready.socket.getsockname()[1]
    with tempfile.TemporaryDirectory() as log_dir:
        async with ProcessSpawner() as spawner:
            manager = InstanceManager(
                launcher=[sys.executable, "-c", STUBBORN],
                manager_id=f"bench-{uuid.uuid4()}",
                spawner=spawner,
                ports=PortAllocator(),
                gpus=FakeNvml([]),
                probe=never_ready,
                log_dir=log_dir,
                base_env={**os.environ, "BENCH_READY_PORT": str(ready_port)},
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.supervisor.run)
                for name in names:
                    await manager.create(
                        InstanceSpec(name=name, model_id="m", stop_grace_secs=grace)
                    )
                # Each child connects once it ignores SIGTERM.
                with trio.fail_after(60):
                    connections = [await ready.accept() for _ in names]
                began = time.monotonic()
                await manager.supervisor.stop()
                took = time.monotonic() - began
                manager.close()
    for stream in connections:
        await stream.aclose()
    await ready.aclose()
    print(f"instances: {instances}, grace: {grace:g} s, each ignoring SIGTERM")
    print(f"supervisor.stop(): {took:.2f} s (serial would be >= {instances * grace:g} s)")
    print(f"target: under 1.5 x grace -> took/grace = {took / grace:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--grace", type=float, default=3.0)
    args = parser.parse_args()
    trio.run(main, args.instances, args.grace)
