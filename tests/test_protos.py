"""The wire contracts: generated stubs match protos/, and field numbers are TEI's."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from teisup.proto.grpc.health.v1 import health_grpc, health_pb2
from teisup.proto.tei.v1 import tei_grpc, tei_pb2

ROOT = Path(__file__).resolve().parent.parent
GEN_PROTOS = ROOT / "tools" / "gen_protos.py"

needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed, so the stubs cannot be regenerated to compare",
)


def load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", GEN_PROTOS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_grpc_tools
def test_generated_stubs_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(GEN_PROTOS), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_grpc_tools
def test_check_names_stale_missing_and_leftover_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = load_gen_protos()
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "teisup" / "proto", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "tei" / "v1" / "tei_pb2.pyi").write_text("# edited by hand\n")
    (copy / "grpc" / "health" / "v1" / "health_grpc.py").unlink()
    (copy / "tei" / "v1" / "old_pb2.py").write_text("")
    monkeypatch.setattr(gen, "OUT_ROOT", copy)

    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"stale:     {copy / 'tei/v1/tei_pb2.pyi'}" in err
    assert f"missing:   {copy / 'grpc/health/v1/health_grpc.py'}" in err
    assert f"leftover:  {copy / 'tei/v1/old_pb2.py'}" in err
    assert "tei_grpc.py" not in err  # untouched files are not reported


def test_embed_request_round_trip() -> None:
    request = tei_pb2.EmbedRequest(
        inputs="what is a supervisor?",
        truncate=True,
        normalize=True,
        truncation_direction=tei_pb2.TRUNCATION_DIRECTION_LEFT,
        prompt_name="query",
        dimensions=256,
    )
    decoded = tei_pb2.EmbedRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.dimensions == 256
    assert decoded.HasField("dimensions")
    # proto3 `optional`: absence is visible, unlike plain scalars.
    bare = tei_pb2.EmbedRequest.FromString(tei_pb2.EmbedRequest(inputs="x").SerializeToString())
    assert not bare.HasField("dimensions")
    assert not bare.HasField("prompt_name")
    assert bare.normalize is False  # the gRPC default, unlike TEI's HTTP API


def field_numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_field_numbers_are_teis() -> None:
    assert field_numbers(tei_pb2.EmbedRequest) == {
        "inputs": 1,
        "truncate": 2,
        "normalize": 3,
        "truncation_direction": 4,
        "prompt_name": 5,
        "dimensions": 6,
    }
    info = field_numbers(tei_pb2.InfoResponse)
    assert info["version"] == 1
    assert info["model_id"] == 4
    assert info["model_type"] == 7
    assert info["max_input_length"] == 9
    assert info["tokenization_workers"] == 13
    assert len(info) == 13
    assert field_numbers(tei_pb2.RerankStreamRequest)["truncation_direction"] == 6
    assert field_numbers(tei_pb2.SimpleToken)["stop"] == 5
    assert field_numbers(tei_pb2.Metadata)["inference_time_ns"] == 6
    assert field_numbers(health_pb2.HealthCheckRequest) == {"service": 1}
    assert field_numbers(health_pb2.HealthCheckResponse) == {"status": 1}


def test_optional_fields_have_presence() -> None:
    fields = tei_pb2.InfoResponse.DESCRIPTOR.fields_by_name
    optional = {name for name, f in fields.items() if f.has_presence}
    assert optional == {"sha", "docker_label", "model_sha", "max_batch_requests"}


def test_enum_values() -> None:
    assert tei_pb2.ModelType.Value("MODEL_TYPE_RERANKER") == 2
    assert tei_pb2.TruncationDirection.Value("TRUNCATION_DIRECTION_LEFT") == 1
    serving = health_pb2.HealthCheckResponse.ServingStatus
    assert serving.items() == [
        ("UNKNOWN", 0),
        ("SERVING", 1),
        ("NOT_SERVING", 2),
        ("SERVICE_UNKNOWN", 3),
    ]


def test_services_and_rpc_shapes() -> None:
    services = tei_pb2.DESCRIPTOR.services_by_name
    assert sorted(services) == ["Embed", "Info", "Predict", "Rerank", "Tokenize"]
    assert tei_pb2.DESCRIPTOR.package == "tei.v1"
    shapes = {
        (service.name, m.name): (m.client_streaming, m.server_streaming)
        for service in services.values()
        for m in service.methods
    }
    assert shapes[("Embed", "Embed")] == (False, False)
    assert shapes[("Embed", "EmbedStream")] == (True, True)
    assert shapes[("Rerank", "RerankStream")] == (True, False)  # client streaming only
    assert shapes[("Tokenize", "DecodeStream")] == (True, True)
    assert len(shapes) == 17
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert health.full_name == "grpc.health.v1.Health"
    assert [(m.name, m.server_streaming) for m in health.methods] == [
        ("Check", False),
        ("Watch", True),
    ]


def test_generated_modules_live_in_the_package() -> None:
    # protoc would name them tei.v1.tei_pb2 / grpc.health.v1... (grpcio's grpc!).
    assert tei_pb2.EmbedRequest.__module__ == "teisup.proto.tei.v1.tei_pb2"
    assert health_pb2.HealthCheckRequest.__module__ == "teisup.proto.grpc.health.v1.health_pb2"
    assert tei_grpc.InfoServicer().service.name == "tei.v1.Info"
    assert health_grpc.HealthServicer().service.name == "grpc.health.v1.Health"
