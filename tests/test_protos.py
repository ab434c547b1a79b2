"""The wire contracts: generated stubs match protos/, and field numbers are TEI's."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from teisup.proto.grpc.health.v1 import health_grpc, health_pb2
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2

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
    # TEI 1.9: normalize has presence too, so unset (meaning true) is not false.
    assert not bare.HasField("normalize")
    explicit = tei_pb2.EmbedRequest.FromString(
        tei_pb2.EmbedRequest(inputs="x", normalize=False).SerializeToString()
    )
    assert explicit.HasField("normalize")
    assert explicit.normalize is False


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


#: Every message of TEI 1.9.3's tei.v1 and tei-manager 0.12's tei_multiplexer.v1, field by
#: field, as their .proto files declare them: ``[label_]type name=number``.
WIRE_CONTRACT = {
    "tei.v1.InfoRequest": "",
    "tei.v1.InfoResponse": "string version=1 optional_string sha=2 optional_string docker_label=3 "
    "string model_id=4 optional_string model_sha=5 string model_dtype=6 ModelType model_type=7 "
    "uint32 max_concurrent_requests=8 uint32 max_input_length=9 uint32 max_batch_tokens=10 "
    "optional_uint32 max_batch_requests=11 uint32 max_client_batch_size=12 "
    "uint32 tokenization_workers=13",
    "tei.v1.Metadata": "uint32 compute_chars=1 uint32 compute_tokens=2 uint64 total_time_ns=3 "
    "uint64 tokenization_time_ns=4 uint64 queue_time_ns=5 uint64 inference_time_ns=6",
    "tei.v1.EmbedRequest": "string inputs=1 bool truncate=2 optional_bool normalize=3 "
    "TruncationDirection truncation_direction=4 optional_string prompt_name=5 "
    "optional_uint32 dimensions=6",
    "tei.v1.EmbedResponse": "repeated_float embeddings=1 Metadata metadata=2",
    "tei.v1.EmbedSparseRequest": "string inputs=1 bool truncate=2 "
    "TruncationDirection truncation_direction=3 optional_string prompt_name=4",
    "tei.v1.SparseValue": "uint32 index=1 float value=2",
    "tei.v1.EmbedSparseResponse": "repeated_SparseValue sparse_embeddings=1 Metadata metadata=2",
    "tei.v1.EmbedAllRequest": "string inputs=1 bool truncate=2 "
    "TruncationDirection truncation_direction=3 optional_string prompt_name=4",
    "tei.v1.TokenEmbedding": "repeated_float embeddings=1",
    "tei.v1.EmbedAllResponse": "repeated_TokenEmbedding token_embeddings=1 Metadata metadata=2",
    "tei.v1.PredictRequest": "string inputs=1 bool truncate=2 bool raw_scores=3 "
    "TruncationDirection truncation_direction=4",
    "tei.v1.PredictPairRequest": "repeated_string inputs=1 bool truncate=2 bool raw_scores=3 "
    "TruncationDirection truncation_direction=4",
    "tei.v1.Prediction": "float score=1 string label=2",
    "tei.v1.PredictResponse": "repeated_Prediction predictions=1 Metadata metadata=2",
    "tei.v1.RerankRequest": "string query=1 repeated_string texts=2 bool truncate=3 "
    "bool raw_scores=4 bool return_text=5 TruncationDirection truncation_direction=6",
    "tei.v1.RerankStreamRequest": "string query=1 string text=2 bool truncate=3 "
    "bool raw_scores=4 bool return_text=5 TruncationDirection truncation_direction=6",
    "tei.v1.Rank": "uint32 index=1 optional_string text=2 float score=3",
    "tei.v1.RerankResponse": "repeated_Rank ranks=1 Metadata metadata=2",
    "tei.v1.EncodeRequest": "string inputs=1 bool add_special_tokens=2 "
    "optional_string prompt_name=3",
    "tei.v1.SimpleToken": "uint32 id=1 string text=2 bool special=3 optional_uint32 start=4 "
    "optional_uint32 stop=5",
    "tei.v1.EncodeResponse": "repeated_SimpleToken tokens=1",
    "tei.v1.DecodeRequest": "repeated_uint32 ids=1 bool skip_special_tokens=2",
    "tei.v1.DecodeResponse": "string text=1",
    "tei_multiplexer.v1.Target": "oneof_routing_string instance_name=1 "
    "oneof_routing_string model_id=2 oneof_routing_uint32 instance_index=3",
    "tei_multiplexer.v1.InfoRequest": "Target target=1",
    "tei_multiplexer.v1.EmbedRequest": "Target target=1 tei.v1.EmbedRequest request=2",
    "tei_multiplexer.v1.EmbedSparseRequest": "Target target=1 tei.v1.EmbedSparseRequest request=2",
    "tei_multiplexer.v1.EmbedAllRequest": "Target target=1 tei.v1.EmbedAllRequest request=2",
    "tei_multiplexer.v1.PredictRequest": "Target target=1 tei.v1.PredictRequest request=2",
    "tei_multiplexer.v1.PredictPairRequest": "Target target=1 tei.v1.PredictPairRequest request=2",
    "tei_multiplexer.v1.RerankRequest": "Target target=1 tei.v1.RerankRequest request=2",
    "tei_multiplexer.v1.RerankStreamRequest": "Target target=1 "
    "tei.v1.RerankStreamRequest request=2",
    "tei_multiplexer.v1.EncodeRequest": "Target target=1 tei.v1.EncodeRequest request=2",
    "tei_multiplexer.v1.DecodeRequest": "Target target=1 tei.v1.DecodeRequest request=2",
    # A plain bool in tei-manager 0.12 (no presence), unlike tei.v1's normalize.
    "tei_multiplexer.v1.EmbedArrowRequest": "Target target=1 bytes arrow_ipc=2 bool truncate=3 "
    "bool normalize=4 bool noop=5",
    "tei_multiplexer.v1.EmbedArrowResponse": "bytes arrow_ipc=1",
    "tei_multiplexer.v1.EmbedSparseArrowRequest": "Target target=1 bytes arrow_ipc=2 "
    "bool truncate=3 bool noop=4",
    "tei_multiplexer.v1.EmbedSparseArrowResponse": "bytes arrow_ipc=1",
}

_SCALARS = {
    getattr(FieldDescriptor, name): name[5:].lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _render(message: Any) -> str:
    package = message.file.package
    fields = []
    for f in message.fields:
        if f.message_type is not None or f.enum_type is not None:
            kind = (f.message_type or f.enum_type).full_name
            kind = kind.removeprefix(package + ".")
        else:
            kind = _SCALARS[f.type]
        oneof = f.containing_oneof
        if f.is_repeated:
            kind = "repeated_" + kind
        elif oneof is not None and oneof.name.startswith("_"):  # proto3 `optional`
            kind = "optional_" + kind
        elif oneof is not None:
            kind = f"oneof_{oneof.name}_{kind}"
        fields.append(f"{kind} {f.name}={f.number}")
    return " ".join(fields)


def test_every_message_is_field_for_field_tei_193_and_tei_manager_012() -> None:
    messages = {}
    for module in (tei_pb2, multiplexer_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            messages[message.full_name] = _render(message)
    assert messages == WIRE_CONTRACT


def test_the_multiplexer_service_is_tei_managers() -> None:
    service = multiplexer_pb2.DESCRIPTOR.services_by_name["TeiMultiplexer"]
    assert service.full_name == "tei_multiplexer.v1.TeiMultiplexer"
    shapes = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                 m.server_streaming)
        for m in service.methods
    }  # fmt: skip
    assert sorted(shapes) == sorted(
        [
            "Info",
            "Embed",
            "EmbedStream",
            "EmbedSparse",
            "EmbedSparseStream",
            "EmbedAll",
            "EmbedAllStream",
            "EmbedArrow",
            "EmbedSparseArrow",
            "Predict",
            "PredictPair",
            "PredictStream",
            "PredictPairStream",
            "Rerank",
            "RerankStream",
            "Tokenize",
            "TokenizeStream",
            "Decode",
            "DecodeStream",
        ]
    )
    mux, tei = "tei_multiplexer.v1.", "tei.v1."
    assert shapes["EmbedArrow"] == (mux + "EmbedArrowRequest", mux + "EmbedArrowResponse",
                                    False, False)  # fmt: skip
    assert shapes["RerankStream"] == (mux + "RerankStreamRequest", tei + "RerankResponse",
                                      True, False)  # fmt: skip
    assert shapes["DecodeStream"] == (mux + "DecodeRequest", tei + "DecodeResponse", True, True)
    assert shapes["Info"] == (mux + "InfoRequest", tei + "InfoResponse", False, False)
