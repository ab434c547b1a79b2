"""A restarted ``instances`` supervisor brings back what it held (issue 11, item 1).

As in OTP, a supervisor its parent restarts starts empty; the manager, which
keeps every instance's spec and desired state, starts again the ones that
should run. The crash is real: the supervisor is given an intensity of zero
restarts and one of its children exits, so it gives up, stops its children and
its parent restarts it.
"""

from __future__ import annotations

from pathlib import Path

import trio

from teisup.instances import Desired, InstanceSpec
from teisup.supervision import (
    Backoff,
    ChildContext,
    ChildSpec,
    ChildState,
    Intensity,
    Supervisor,
)

from ..supervision.helpers import wait_for
from .conftest import running_manager, wait_gone

MODEL = "BAAI/bge-small-en-v1.5"


async def test_a_restarted_instances_supervisor_brings_its_instances_back(
    tmp_path: Path,
) -> None:
    boom = trio.Event()

    async def bomb(ctx: ChildContext) -> None:
        ctx.started()
        await boom.wait()  # then returns: a permanent child's exit is a restart

    with trio.fail_after(60):
        async with running_manager(tmp_path, supervise=False) as manager:
            manager.supervisor.intensity = Intensity(max_restarts=0, period=60)
            root = Supervisor(
                "root",
                [
                    ChildSpec("instances", manager.supervisor),
                    ChildSpec("restore", manager.keep_children),
                ],
                intensity=Intensity(max_restarts=5, period=60),
            )
            with root.events.subscribe() as events:
                async with trio.open_nursery() as nursery:
                    await nursery.start(root.run)
                    await manager.create(InstanceSpec(name="a", model_id=MODEL))
                    await manager.create(InstanceSpec(name="b", model_id=MODEL), start=False)
                    await wait_for(events, "a", ChildState.RUNNING)
                    before = manager.get("a")
                    assert before.pid is not None
                    await manager.supervisor.start_child(
                        ChildSpec("bomb", bomb, backoff=Backoff(initial=0))
                    )
                    boom.set()
                    gave_up = await wait_for(events, "instances", ChildState.BACKOFF)
                    assert "RestartIntensityExceeded" in gave_up.reason
                    await wait_for(events, "instances", ChildState.RUNNING)
                    await wait_for(events, "a", ChildState.RUNNING)
                    await wait_gone(before.pid)
                    after = manager.get("a")
                    assert (after.name, after.port, after.status) == (
                        "a",
                        before.port,
                        ChildState.RUNNING,
                    )
                    assert after.pid != before.pid
                    assert after.desired is Desired.RUNNING
                    stopped = manager.get("b")
                    assert (stopped.status, stopped.desired) == (
                        ChildState.STOPPED,
                        Desired.STOPPED,
                    )
                    # The supervisor's own dynamic child is gone, as in OTP.
                    ids = [c.id for c in manager.supervisor.which_children()]
                    assert ids == ["a"]
                    await root.stop()
