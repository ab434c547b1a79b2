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
from ..instances import NAME_PATTERN, GpuInfo, InstanceInfo, InstanceSpec, LogLine
from ..models import ModelInfo
from ..supervision import ChildState, TreeNode
from .dataplane import (
    DecodeBody,
    EmbedAllBody,
    EmbedBody,
    OpenAIEmbeddingsBody,
    PredictBody,
    RerankBody,
    SimilarityBody,
    TokenizeBody,
)
from .errors import Error, OpenAIError, TeiError
from .models import ModelRegistration
from .views import instance_schema

__all__ = ["ROUTES", "openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A response: its description and its JSON body's schema."""
    return {"description": description, **_json_body(schema)}


def _request(schema: dict[str, Any]) -> dict[str, Any]:
    """A required JSON request body of ``schema``."""
    return {"required": True, **_json_body(schema)}


_ERROR = _answer("an error", _ref("Error"))
#: Instance names are what InstanceSpec allows; no other name can exist.
_NAME = [
    {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": NAME_PATTERN},
    }
]
_INSTANCE = _answer("the instance", _ref("InstanceInfo"))
#: A lifecycle call's answer: applied, and whether it is on disk yet.
_DURABLE = {
    "X-Teisup-Durable": {
        "description": "whether the state file holds this change yet (the writer retries)",
        "required": True,
        "schema": {"type": "string", "enum": ["true", "false"]},
    }
}
_APPLIED_BODY = _json_body(
    {
        "allOf": [
            _ref("InstanceInfo"),
            {
                "type": "object",
                "properties": {"durable": {"type": "boolean"}},
                "required": ["durable"],
            },
        ]
    }
)
_APPLIED = {"description": "the instance, changed", "headers": _DURABLE, **_APPLIED_BODY}
#: The longest ``?wait=`` (seconds); the app refuses more with 400.
MAX_WAIT = 900.0
_WAIT = [
    {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "answer once the instance is in this state",
        "schema": {"type": "string", "enum": [state.value for state in ChildState]},
    },
    {
        "name": "timeout",
        "in": "query",
        "required": False,
        "description": "seconds to wait (with wait); default 30",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 30},
    },
]

#: A Hub id, URL-encoded (``org%2Fname``) or not; an unknown one answers 404.
_MODEL_ID = [
    {
        "name": "model_id",
        "in": "path",
        "required": True,
        "description": "a Hub model id such as sentence-transformers%2Fall-MiniLM-L6-v2",
        "schema": {"type": "string", "minLength": 1},
    }
]
_MODEL = _answer("the model", _ref("ModelInfo"))

_DATA_ERROR = _answer("a TEI-style error", _ref("TeiError"))
_OPENAI_ERROR = _answer("an OpenAI-style error", _ref("OpenAIError"))
_DATA_CODES = ("400", "404", "413", "422", "424", "429", "502", "503", "504")

_NUMBER = {"type": "number"}


def _rows(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}


_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STRING = {"type": ["string", "null"]}
_SPARSE_VALUE = _object({"index": {"type": "integer"}, "value": _NUMBER})
_PREDICTIONS = _rows(_object({"score": _NUMBER, "label": {"type": "string"}}))
_RANK = {
    **_object({"index": {"type": "integer"}, "score": _NUMBER}),
    "properties": {"index": {"type": "integer"}, "score": _NUMBER, "text": {"type": "string"}},
}
_TOKEN = _object(
    {
        "id": {"type": "integer"},
        "text": {"type": "string"},
        "special": {"type": "boolean"},
        "start": _NULLABLE_INT,
        "stop": _NULLABLE_INT,
    }
)
_TEI_INFO = _object(
    {
        "model_id": {"type": "string"},
        "model_sha": _NULLABLE_STRING,
        "model_dtype": {"type": "string"},
        "model_type": {"type": "object"},
        "max_concurrent_requests": {"type": "integer"},
        "max_input_length": {"type": "integer"},
        "max_batch_tokens": {"type": "integer"},
        "max_batch_requests": _NULLABLE_INT,
        "max_client_batch_size": {"type": "integer"},
        "auto_truncate": {"type": "boolean"},
        "tokenization_workers": {"type": "integer"},
        "version": {"type": "string"},
        "sha": _NULLABLE_STRING,
        "docker_label": _NULLABLE_STRING,
    }
)
_MODEL_LIST = _object(
    {
        "object": {"const": "list"},
        "data": _rows(
            _object(
                {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                }
            )
        ),
    }
)

#: path -> method -> operation (without the generated parts).
ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/health": {"get": {"summary": "Manager health and an aggregate over instances"}},
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format)",
            "responses": {
                "200": {
                    "description": "the metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _answer("OpenAPI 3.1", {"type": "object"})},
        }
    },
    "/gpus": {
        "get": {
            "summary": "GPUs seen through NVML (empty without a driver)",
            "responses": {"200": _answer("GPUs", _rows(_ref("GpuInfo")))},
        }
    },
    "/supervisor/tree": {
        "get": {
            "summary": "The supervision tree",
            "responses": {"200": _answer("the root node", _ref("TreeNode"))},
        }
    },
    "/instances": {
        "get": {
            "summary": "All instances, by name",
            "responses": {"200": _answer("instances", _rows(_ref("InstanceInfo")))},
        },
        "post": {
            "summary": "Create an instance and start it (answers at once, state starting)",
            "requestBody": _request(_ref("InstanceSpec")),
            "responses": {"201": _APPLIED, "400": _ERROR, "413": _ERROR},
        },
    },
    "/instances/{name}": {
        "get": {
            "summary": "One instance; with ?wait=, once it is in that state",
            "description": (
                "With `wait`, answers 200 once the instance is in that state; 409 "
                "(STATE_UNREACHABLE) at once when it cannot get there without a call: it "
                "is failed, or stopped on request; 404 if it is deleted meanwhile; 409 "
                "(WAIT_TIMEOUT) with its current state in the message after `timeout` seconds."
            ),
            "parameters": [*_NAME, *_WAIT],
            "responses": {"200": _INSTANCE, "400": _ERROR, "404": _ERROR, "409": _ERROR},
        },
        "delete": {
            "summary": "Stop and forget an instance",
            "parameters": _NAME,
            "responses": {"204": {"description": "deleted", "headers": _DURABLE}, "404": _ERROR},
        },
    },
    **{
        f"/instances/{{name}}/{action}": {
            "post": {
                "summary": f"{action.capitalize()} an instance (idempotent)",
                "parameters": _NAME,
                "responses": {"200": _APPLIED, "400": _ERROR, "404": _ERROR},
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
                {
                    "name": "format",
                    "in": "query",
                    "required": False,
                    "description": "text (default): each line as the log file holds it, "
                    "as tei-manager answers; parsed: each line's time, stream, level, target "
                    "and message",
                    "schema": {"type": "string", "enum": ["text", "parsed"]},
                },
            ],
            "responses": {
                "200": _answer(
                    "log lines", {"anyOf": [_ref("LogsResponse"), _ref("ParsedLogsResponse")]}
                ),
                "400": _ERROR,
                "404": _ERROR,
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
                "requestBody": _request(_ref(body)),
                "responses": {
                    "200": _answer(f"TEI's /{route} answer", answer),
                    **dict.fromkeys(_DATA_CODES, _DATA_ERROR),
                },
            }
        }
        for route, body, answer in (
            ("embed", "EmbedBody", _rows(_rows(_NUMBER))),
            ("embed_all", "EmbedAllBody", _rows(_rows(_rows(_NUMBER)))),
            ("embed_sparse", "EmbedBody", _rows(_rows(_SPARSE_VALUE))),
            ("predict", "PredictBody", {"anyOf": [_PREDICTIONS, _rows(_PREDICTIONS)]}),
            ("rerank", "RerankBody", _rows(_RANK)),
            ("similarity", "SimilarityBody", _rows(_NUMBER)),
            ("tokenize", "TokenizeBody", _rows(_rows(_TOKEN))),
            ("decode", "DecodeBody", _rows({"type": "string"})),
        )
    },
    "/models": {
        "get": {
            "summary": "Registered models, by id (tei-manager's registry)",
            "responses": {"200": _answer("models", _rows(_ref("ModelInfo")))},
        },
        "post": {
            "summary": "Register a model (200 with the entry if it is registered already)",
            "requestBody": _request(_ref("ModelRegistration")),
            "responses": {
                "200": _MODEL,
                "201": _MODEL,
                "400": _ERROR,
                "413": _ERROR,
                "422": _ERROR,
            },
        },
    },
    "/models/{model_id}": {
        "get": {
            "summary": "One model, its files in the HuggingFace cache looked at again",
            "parameters": _MODEL_ID,
            "responses": {"200": _MODEL, "404": _ERROR},
        }
    },
    "/models/{model_id}/download": {
        "post": {
            "summary": "Download the model from the Hub; answers once it is in the cache",
            "description": (
                "Progress shows in GET /models/{model_id} (`progress`), /metrics and the "
                "log meanwhile. Already downloaded: answers at once. 502 "
                "(MODEL_DOWNLOAD_FAILED) when the Hub or the network failed; nothing "
                "partial is left in the cache."
            ),
            "parameters": _MODEL_ID,
            "responses": {
                "200": _MODEL,
                "404": _ERROR,
                "409": _ERROR,
                "502": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/models/{model_id}/load": {
        "post": {
            "summary": "Smoke test: start an instance of the model, embed once, stop it",
            "description": (
                "200 with status verified, or failed and verification_error; 409 "
                "MODEL_BUSY while a download or test runs, 409 MODEL_LOAD_FAILED when "
                "it is not downloaded."
            ),
            "parameters": _MODEL_ID,
            "responses": {"200": _MODEL, "404": _ERROR, "409": _ERROR, "503": _ERROR},
        }
    },
    "/instances/{name}/info": {
        "get": {
            "summary": "TEI's GET /info of this instance (data plane)",
            "parameters": _NAME,
            "responses": {
                "200": _answer("TEI's /info answer", _TEI_INFO),
                **dict.fromkeys(_DATA_CODES, _DATA_ERROR),
            },
        }
    },
    **{
        path: {
            "post": {
                "summary": "OpenAI-compatible embeddings; model = an instance name or a model id",
                "requestBody": _request(_ref("OpenAIEmbeddingsBody")),
                "responses": {
                    "200": {"description": "OpenAI's embedding list"},
                    **dict.fromkeys(_DATA_CODES, _OPENAI_ERROR),
                },
            }
        }
        for path in ("/v1/embeddings", "/embeddings")
    },
    "/v1/models": {
        "get": {
            "summary": "OpenAI's model list: what /v1/embeddings accepts as model",
            "description": "Every instance name, then every model id not already listed.",
            "responses": {"200": _answer("the models", _MODEL_LIST)},
        }
    },
}


class LogsResponse(msgspec.Struct):
    """tei-manager's answer: each line as the log file holds it."""

    lines: list[str]
    start: int
    end: int
    total_lines: int


class ParsedLine(msgspec.Struct, omit_defaults=True):
    """One line, parsed: the message of a TEI JSON line, or the text of any other."""

    time: float
    stream: str
    message: str
    level: str | None = None
    target: str | None = None

    @classmethod
    def of(cls, line: LogLine) -> ParsedLine:
        message = line.message if line.message is not None else line.text
        return cls(line.time, line.stream, message, line.level, line.target)


class ParsedLogsResponse(msgspec.Struct):
    """``?format=parsed``: each line's fields."""

    lines: list[ParsedLine]
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
            ParsedLogsResponse,
            TeiError,
            OpenAIError,
            EmbedBody,
            EmbedAllBody,
            PredictBody,
            RerankBody,
            SimilarityBody,
            TokenizeBody,
            DecodeBody,
            OpenAIEmbeddingsBody,
            ModelInfo,
            ModelRegistration,
        ],
        ref_template=_REF,
    )
    # The API answers tei-manager's status and integer uptime beside teisup's.
    components["InstanceInfo"] = instance_schema(components["InstanceInfo"])
    paths: dict[str, Any] = {}
    for path, methods in ROUTES.items():
        paths[path] = {}
        for method, operation in methods.items():
            op = {"responses": {"200": {"description": "OK"}}, **operation}
            slug = path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
            op["operationId"] = f"{method}_{slug or 'root'}"
            paths[path][method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "teisup control plane", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
