"""One gRPC boundary: only `teisup.rpc` imports purerpc, h2, hpack, hyperframe or anyio.

The generated stubs in `teisup.proto` are the one exception: protoc's purerpc
plugin writes ``import purerpc`` into them. Imports are read with `ast`, so
a name in a comment or a string does not count, and an import inside a
function, under ``TYPE_CHECKING`` or through ``importlib`` does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import teisup

TRANSPORT = frozenset({"purerpc", "h2", "hpack", "hyperframe", "anyio"})
ROOT = Path(teisup.__file__).resolve().parent
ALLOWED = (ROOT / "rpc", ROOT / "proto")


def transport_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a transport package in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found.extend((node.lineno, name) for name in names if name.split(".", 1)[0] in TRANSPORT)
    return found


def outside_the_boundary() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not any(path.is_relative_to(allowed) for allowed in ALLOWED)
    )


def test_the_check_sees_every_form_of_import() -> None:
    source = (
        "import h2.connection\n"
        "from purerpc import StatusCode\n"
        "def f():\n"
        "    import anyio\n"
        "    importlib.import_module('hyperframe.frame')\n"
        "import hpack as packing\n"
        "from . import anyio_like\n"
        "import h2o\n"
        "# import purerpc\n"
        "x = 'from purerpc import Server'\n"
    )
    assert sorted(transport_imports(source)) == [
        (1, "h2.connection"),
        (2, "purerpc"),
        (4, "anyio"),
        (5, "hyperframe.frame"),
        (6, "hpack"),
    ]


def test_the_boundary_covers_the_packages() -> None:
    paths = outside_the_boundary()
    packages = {path.relative_to(ROOT).parts[0] for path in paths}
    assert {"grpc", "embedded", "api", "instances", "service", "bench.py"} <= packages


@pytest.mark.parametrize("path", outside_the_boundary(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_teisup_rpc_imports_the_transport(path: Path) -> None:
    found = transport_imports(path.read_text())
    assert found == [], f"{path.relative_to(ROOT)} imports {found}: go through teisup.rpc"
