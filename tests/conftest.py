"""Fixtures shared by every test package."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every teisup the suite starts serves gRPC in-process unless a test asks for
# worker processes (tests/service/test_grpc_workers.py does): one process
# less per manager, on a loaded machine.
os.environ.setdefault("TEISUP_GRPC_WORKERS", "1")

# huggingface_hub reads HF_HUB_OFFLINE once, when first imported. An embedded
# engine loaded in this process sets it (the backend runs offline), so import
# it now, while the environment is the one the suite was started with: the
# model registry's tests download in this process from a loopback Hub.
importlib.import_module("huggingface_hub.constants")


@pytest.fixture(scope="session")
def mux_stubs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """grpcio's ``multiplexer_pb2`` / ``_pb2_grpc`` and ``tei_pb2``, from grpcio-tools.

    The client nobody on this team wrote.
    """
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("grpcio_mux_stubs")
    protos = ROOT / "protos"
    argv = [
        "protoc",
        f"-I{protos}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(protos / "tei" / "v1" / "tei.proto"),
        str(protos / "tei_multiplexer" / "v1" / "multiplexer.proto"),
    ]
    assert protoc.main(argv) == 0
    sys.path.insert(0, str(out))
    try:
        modules: dict[str, ModuleType] = {
            "tei_pb2": importlib.import_module("tei.v1.tei_pb2"),
            "pb2": importlib.import_module("tei_multiplexer.v1.multiplexer_pb2"),
            "pb2_grpc": importlib.import_module("tei_multiplexer.v1.multiplexer_pb2_grpc"),
        }
    finally:
        sys.path.remove(str(out))
    return SimpleNamespace(**modules)
