"""The OpenAPI document matches the application's real routes."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from teisup.api import create_app, openapi_document
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
    tls = None


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
