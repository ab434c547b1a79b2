"""teisup as a user runs it: what an instance leaves outside its group goes too."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from teisup.instances.process import proc_state

from ..instances.conftest import wait_gone
from .test_service_e2e import SMALL, teisup, wait_state


async def test_a_hung_instance_killed_at_once_leaves_no_detached_grandchild(
    tmp_path: Path,
) -> None:
    # A hung instance is SIGKILLed with its group, shim included; the grandchild
    # that left the group comes back to teisup, whose reaper kills it.
    env = {"FAKE_TEI_DETACHED_GRANDCHILD": "1", "FAKE_TEI_HANG": "0.5"}
    async with teisup(tmp_path, env=env) as t:
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        lines = (await t.http.get("/instances/bge-small/logs")).json()["lines"]
        [detached] = [
            int(m.group(1))
            for line in lines
            if (m := re.search(r"detached grandchild (\d+)", str(line)))
        ]
        with trio.fail_after(60):
            await wait_gone(detached)
        assert proc_state(detached) in (None, "Z")
        assert await t.stop() == 0
