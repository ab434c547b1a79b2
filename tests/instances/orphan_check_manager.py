"""A manager process for the kill -9 test: one instance, then wait to be killed.

Prints one JSON line once the instance is running:
``{"pid": <instance pid>, "grandchild": <pid of the instance's own child>}``.
Usage: ``python orphan_check_manager.py MANAGER_ID LOG_DIR``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import trio

from teisup.instances import InstanceSpec, set_child_subreaper
from teisup.supervision import ChildState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.instances.conftest import running_manager
from tests.supervision.helpers import wait_for


async def main(manager_id: str, log_dir: str) -> None:
    set_child_subreaper()
    async with running_manager(
        trio.Path(log_dir), env={"FAKE_TEI_GRANDCHILD": "1"}, manager_id=manager_id
    ) as manager:
        with manager.supervisor.events.subscribe() as events:
            await manager.create(InstanceSpec(name="victim", model_id="m"))
            await wait_for(events, "victim", ChildState.RUNNING)
        [grandchild] = [
            int(m.group(1))
            for line in manager.logs("victim")
            if (m := re.fullmatch(r"grandchild (\d+)", line.message or ""))
        ]
        print(json.dumps({"pid": manager.get("victim").pid, "grandchild": grandchild}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
