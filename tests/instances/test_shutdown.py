"""Stopping the instances supervisor stops every instance at once (issue 11, item 8)."""

from __future__ import annotations

from pathlib import Path

import trio

from teisup.instances import InstanceSpec, RestartPolicy
from teisup.instances.process import proc_state
from teisup.supervision import ChildState

from ..supervision.helpers import drain
from .conftest import free_ports, running_manager

NAMES = [f"stuck-{n}" for n in range(5)]
GRACE = 3.0


async def test_instances_that_ignore_sigterm_are_stopped_in_parallel(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_manager(tmp_path, env={"FAKE_TEI_IGNORE_SIGTERM": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                for name, port in zip(NAMES, free_ports(len(NAMES)), strict=True):
                    await manager.create(
                        InstanceSpec(
                            name=name,
                            model_id="BAAI/bge-small-en-v1.5",
                            restart=RestartPolicy(),
                            stop_grace_secs=GRACE,
                            port=port,
                        )
                    )
                running: set[str] = set()
                async for event in events:
                    if event.new is ChildState.RUNNING:
                        running.add(event.child_id)
                        if running == set(NAMES):
                            break
                pids = [manager.get(name).pid for name in NAMES]
                assert all(pid is not None and proc_state(pid) is not None for pid in pids)
                await manager.supervisor.stop()
                seen = drain(events)
            # Every instance was asked to stop (SIGTERM) before the first one was
            # killed: their graces ran together, not one after the other.
            stops = [
                (e.child_id, e.new)
                for e in seen
                if e.new in (ChildState.STOPPING, ChildState.STOPPED)
            ]
            assert [state for _, state in stops] == [ChildState.STOPPING] * 5 + [
                ChildState.STOPPED
            ] * 5
            assert {name for name, _ in stops[:5]} == set(NAMES)
            for name in NAMES:
                last_exit = manager.get(name).last_exit
                assert last_exit is not None
                assert last_exit.detail == f"supervisor stopping; killed after {GRACE:g}s grace", [
                    line.text for line in manager.logs(name)
                ]
            assert all(proc_state(pid) is None for pid in pids if pid is not None)
