"""The packages form layers: who may import whom, read from the source (no import side effects)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "teisup"


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "teisup" else None


def imported_modules(path: Path) -> list[str]:
    """The absolute names of the modules ``path`` imports, relative imports resolved."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    here = parts[:-1]  # the package a relative import starts from
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                names.append(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.append(node.module)
    return names


def _own_package(path: Path) -> str | None:
    """``teisup.<package>`` a file belongs to (a top-level module is its own)."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return parts[1] if len(parts) > 1 else None


def imports_by_package() -> dict[str, set[str]]:
    """For each ``teisup.<package>``, the other ``teisup`` packages its modules import."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        package = _own_package(path)
        if package is None or package == "proto":
            continue
        targets = graph.setdefault(package, set())
        for name in imported_modules(path):
            target = _package_of(name)
            if target is not None and target != package:
                targets.add(target)
    return graph


def test_the_graph_sees_known_imports() -> None:
    graph = imports_by_package()
    assert "supervision" in graph["instances"]
    assert "instances" in graph["service"]


@pytest.mark.parametrize("package", ["security", "api", "grpc"])
def test_the_layers_below_the_service_do_not_import_it(package: str) -> None:
    assert "service" not in imports_by_package()[package]


def test_security_depends_on_no_other_teisup_package() -> None:
    assert imports_by_package()["security"] == set()


def test_no_cycle_between_service_api_and_security() -> None:
    graph = imports_by_package()
    group = {"service", "api", "security"}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, set()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = [p for p in sorted(group) if reaches(p, p)]
    assert cycles == []


# From the bottom up, as ARCHITECTURE.md's "Layers" lists them: a package may
# import only those before it.
LAYERS = [
    "proto",
    "supervision",
    "security",
    "rpc",
    "instances",
    "embedded",
    "grpc",
    "models",
    "api",
    "service",
    "bench",
    "cli",
    "__main__",
]


def test_every_package_has_a_place_in_the_layers() -> None:
    assert set(imports_by_package()) | {"proto"} == set(LAYERS)


@pytest.mark.parametrize("package", LAYERS[1:])
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    below = set(LAYERS[: LAYERS.index(package)])
    assert imports_by_package()[package] - below == set()


def test_architecture_lists_the_layers_in_this_order() -> None:
    text = (ROOT.parent / "ARCHITECTURE.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `teisup.")]
    assert rows == [f"teisup.{name}" for name in LAYERS if name != "__main__"]


def deep_imports() -> list[str]:
    """Imports of a module inside another teisup package, past its ``__init__``."""
    deep = []
    for path in ROOT.rglob("*.py"):
        own = _own_package(path)
        if own == "proto":
            continue
        for name in imported_modules(path):
            target = name.split(".")
            if target[0] == "teisup" and len(target) > 2 and target[1] not in (own, "proto"):
                deep.append(f"{path.relative_to(ROOT)}: {name}")
    return deep


def test_other_packages_import_a_package_through_its_export_list() -> None:
    assert deep_imports() == []
