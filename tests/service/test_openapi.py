"""The OpenAPI document matches the application's real routes."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import jsonschema
import msgspec
from openapi_spec_validator import validate

from teisup.api import create_app, openapi_document
from teisup.api.errors import Error, OpenAIError, TeiError
from teisup.security import AllowList


class _Plane:
    """Only what create_app reads while building routes (nothing is served)."""

    manager: Any = None
    root: Any = None
    api_token = None
    protect_health_and_metrics = False
    data_plane: Any = object()  # only handed to the routes, never called here
    data_body_limit = 1 << 20
    allow_list = AllowList()
    instance_defaults = MappingProxyType({})
    tls = None
    models: Any = None  # read per request only


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    app = create_app(_Plane())  # type: ignore[arg-type]
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((path, method.lower()))
    documented = {
        (path, method)
        for path, methods in openapi_document()["paths"].items()
        for method in methods
    }
    assert served == documented


def test_the_document_is_valid_json_with_the_instance_schemas() -> None:
    document = msgspec.json.decode(msgspec.json.encode(openapi_document()))
    schemas = document["components"]["schemas"]
    assert {"InstanceSpec", "InstanceInfo", "TreeNode", "GpuInfo", "Error"} <= set(schemas)
    assert "model_id" in schemas["InstanceSpec"]["required"]


def test_the_document_is_valid_openapi_3_1() -> None:
    document = msgspec.json.decode(msgspec.json.encode(openapi_document()))
    assert document["openapi"] == "3.1.0"
    validate(document)  # openapi-spec-validator picks the 3.1 rules from the version


def test_the_error_schemas_are_those_of_the_structs_the_code_answers_with() -> None:
    schemas = openapi_document()["components"]["schemas"]
    _, generated = msgspec.json.schema_components(
        [Error, TeiError, OpenAIError], ref_template="#/components/schemas/{name}"
    )
    for name, schema in generated.items():
        assert schemas[name] == schema
    assert schemas["Error"]["required"] == ["error", "code", "timestamp"]


def test_every_pattern_reads_the_same_in_ecmascript() -> None:
    # JSON Schema patterns are ECMAScript: no Python-only \Z or (?P<...>).
    text = msgspec.json.encode(openapi_document()).decode()
    patterns = re.findall(r'"pattern":"((?:[^"\\]|\\.)*)"', text)
    assert patterns
    for pattern in patterns:
        assert "\\\\Z" not in pattern, pattern
        assert "(?P" not in pattern, pattern


def _operation(method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = openapi_document()["paths"][path][method]
    return operation


async def test_an_error_answer_matches_its_documented_schema_and_a_405_lists_allow() -> None:
    app = create_app(_Plane())  # type: ignore[arg-type]
    client = app.test_client()
    document = msgspec.json.decode(msgspec.json.encode(openapi_document()))

    def check(body: object, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.validate(body, schema)

    refused = await client.put("/instances")
    assert refused.status_code == 405
    assert {m.strip() for m in refused.headers["Allow"].split(",")} >= {"GET", "POST"}
    check(await refused.get_json(), "Error")
    deep = await client.post(
        "/instances", data=b"[" * 1000 + b"]" * 1000, headers={"content-type": "application/json"}
    )
    assert deep.status_code == 400
    assert "400" in _operation("post", "/instances")["responses"]
    check(await deep.get_json(), "Error")
