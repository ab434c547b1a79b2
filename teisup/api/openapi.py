"""The OpenAPI document of the REST API, generated from the msgspec types.

The schemas are the very Structs the handlers decode and encode, so the
document cannot drift from the code; the route table below is checked
against the application's routes by a test.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from .. import __version__
from ..instances import GpuInfo, InstanceInfo, InstanceSpec
from ..instances.logs import LogLine
from ..supervision import TreeNode
from .dataplane import EmbedBody, OpenAIEmbeddingsBody, RerankBody, TokenizeBody

__all__ = ["ROUTES", "openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_ERROR = {"description": "an error", **_json_body(_ref("Error"))}
_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_INSTANCE = {"description": "the instance", **_json_body(_ref("InstanceInfo"))}

_DATA_ERROR = {"description": "a TEI-style error", **_json_body(_ref("DataPlaneError"))}
_DATA_CODES = ("400", "404", "413", "422", "424", "429", "502", "503", "504")

#: path -> method -> operation (without the generated parts).
ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/health": {"get": {"summary": "Manager health and an aggregate over instances"}},
    "/metrics": {"get": {"summary": "Prometheus metrics (text format)"}},
    "/openapi.json": {"get": {"summary": "This document"}},
    "/gpus": {
        "get": {
            "summary": "GPUs seen through NVML (empty without a driver)",
            "responses": {
                "200": {
                    "description": "GPUs",
                    **_json_body({"type": "array", "items": _ref("GpuInfo")}),
                }
            },
        }
    },
    "/supervisor/tree": {
        "get": {
            "summary": "The supervision tree",
            "responses": {"200": {"description": "the root node", **_json_body(_ref("TreeNode"))}},
        }
    },
    "/instances": {
        "get": {
            "summary": "All instances, by name",
            "responses": {
                "200": {
                    "description": "instances",
                    **_json_body({"type": "array", "items": _ref("InstanceInfo")}),
                }
            },
        },
        "post": {
            "summary": "Create an instance and start it (answers at once, state starting)",
            "requestBody": {"required": True, **_json_body(_ref("InstanceSpec"))},
            "responses": {
                "201": _INSTANCE,
                "400": _ERROR,
                "409": _ERROR,
                "413": _ERROR,
                "422": _ERROR,
            },
        },
    },
    "/instances/{name}": {
        "get": {
            "summary": "One instance",
            "parameters": _NAME,
            "responses": {"200": _INSTANCE, "404": _ERROR},
        },
        "delete": {
            "summary": "Stop and forget an instance",
            "parameters": _NAME,
            "responses": {"204": {"description": "deleted"}, "404": _ERROR},
        },
    },
    **{
        f"/instances/{{name}}/{action}": {
            "post": {
                "summary": f"{action.capitalize()} an instance (idempotent)",
                "parameters": _NAME,
                "responses": {"200": _INSTANCE, "404": _ERROR},
            }
        }
        for action in ("start", "stop", "restart")
    },
    "/instances/{name}/logs": {
        "get": {
            "summary": "The instance's recent log lines",
            "parameters": [
                *_NAME,
                *(
                    {"name": q, "in": "query", "required": False, "schema": {"type": "integer"}}
                    for q in ("tail", "start", "end")
                ),
            ],
            "responses": {
                "200": {"description": "log lines", **_json_body(_ref("LogsResponse"))},
                "404": _ERROR,
                "422": _ERROR,
            },
        }
    },
    "/instances/{name}/health": {
        "get": {
            "summary": "The prober's view plus a live probe",
            "parameters": _NAME,
            "responses": {"200": {"description": "health"}, "404": _ERROR},
        }
    },
    **{
        f"/instances/{{name}}/{route}": {
            "post": {
                "summary": f"TEI's POST /{route} on this instance (data plane)",
                "parameters": _NAME,
                "requestBody": {"required": True, **_json_body(_ref(body))},
                "responses": {
                    "200": {"description": f"TEI's /{route} answer"},
                    **dict.fromkeys(_DATA_CODES, _DATA_ERROR),
                },
            }
        }
        for route, body in (
            ("embed", "EmbedBody"),
            ("embed_sparse", "EmbedBody"),
            ("rerank", "RerankBody"),
            ("tokenize", "TokenizeBody"),
        )
    },
    "/v1/embeddings": {
        "post": {
            "summary": "OpenAI-compatible embeddings; model = an instance name or a model id",
            "requestBody": {"required": True, **_json_body(_ref("OpenAIEmbeddingsBody"))},
            "responses": {
                "200": {"description": "OpenAI's embedding list"},
                **{code: {"description": "an OpenAI-style error"} for code in _DATA_CODES},
            },
        }
    },
}


class Error(msgspec.Struct):
    """Every error response."""

    error: str
    code: str
    timestamp: str


class DataPlaneError(msgspec.Struct):
    """Errors of the TEI-style data-plane routes: TEI's fields and teisup's."""

    error: str
    error_type: str
    code: str
    timestamp: str


class LogsResponse(msgspec.Struct):
    lines: list[LogLine]
    start: int
    end: int
    total_lines: int


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            InstanceSpec,
            InstanceInfo,
            GpuInfo,
            TreeNode,
            Error,
            LogsResponse,
            DataPlaneError,
            EmbedBody,
            RerankBody,
            TokenizeBody,
            OpenAIEmbeddingsBody,
        ],
        ref_template=_REF,
    )
    paths: dict[str, Any] = {}
    for path, methods in ROUTES.items():
        paths[path] = {}
        for method, operation in methods.items():
            op = {"responses": {"200": {"description": "OK"}}, **operation}
            slug = path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
            op["operationId"] = f"{method}_{slug or 'root'}"
            paths[path][method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "teisup control plane", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
