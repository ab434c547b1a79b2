"""The docs' examples run, and say what they claim."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def test_architecture_example_builds_and_stops_a_two_level_tree() -> None:
    [example] = python_blocks("ARCHITECTURE.md")
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=True
    )
    snapshot, *transitions = out.stdout.splitlines()
    tree = json.loads(snapshot)
    assert [c["id"] for c in tree["children"]] == ["instances", "api"]
    assert [c["id"] for c in tree["children"][0]["children"]] == [
        "bge-small",
        "splade",
        "reranker",
    ]
    assert all(c["state"] == "running" for c in tree["children"][0]["children"])
    stops = [line.split()[0] for line in transitions if line.endswith("-> stopping")]
    assert stops == [
        "root/api",
        "root/instances",
        "root/instances/reranker",
        "root/instances/splade",
        "root/instances/bge-small",
    ]


def test_readme_has_exactly_the_two_setup_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    [block] = re.findall(r"## Set up.*?```sh\n(.*?)```", readme, flags=re.S)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
