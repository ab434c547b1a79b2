"""A manager process for the kill -9 test: instances, then wait to be killed.

Each instance's fake TEI starts a grandchild in its process group and one
that left it (``setsid`` after a double fork). Prints one JSON line once every
instance is running: per instance, its pid, both grandchildren and every
process of its tree at that moment.
Usage: ``python orphan_check_manager.py MANAGER_ID LOG_DIR [COUNT]``.
"""

from __future__ import annotations

import json
import os
import re
import sys

import trio

from teisup.instances import InstanceSpec, set_child_subreaper
from teisup.instances.process import descendants
from teisup.supervision import ChildState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.instances.conftest import running_manager

KNOBS = {"FAKE_TEI_GRANDCHILD": "1", "FAKE_TEI_DETACHED_GRANDCHILD": "1"}


def logged_pid(lines: list[str], what: str) -> int:
    [pid] = [int(m.group(1)) for line in lines if (m := re.fullmatch(rf"{what} (\d+)", line))]
    return pid


async def main(manager_id: str, log_dir: str, count: int) -> None:
    set_child_subreaper()
    async with running_manager(trio.Path(log_dir), env=KNOBS, manager_id=manager_id) as manager:
        names = [f"victim-{i}" for i in range(count)]
        with manager.supervisor.events.subscribe() as events:
            for name in names:
                await manager.create(InstanceSpec(name=name, model_id="m"))
            waiting = set(names)
            async for event in events:
                if event.new is ChildState.RUNNING:
                    waiting.discard(event.child_id)
                    if not waiting:
                        break
        report = {}
        for name in names:
            lines = [line.message or "" for line in manager.logs(name)]
            pid = manager.get(name).pid
            assert pid is not None
            report[name] = {
                "pid": pid,
                "grandchild": logged_pid(lines, "grandchild"),
                "detached": logged_pid(lines, "detached grandchild"),
                "tree": [pid, *descendants(pid)],
            }
        print(json.dumps(report), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
