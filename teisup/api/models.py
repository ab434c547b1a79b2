"""tei-manager 0.12's model registry routes: ``/models``.

``{model_id}`` is a Hub id, URL-encoded (``sentence-transformers%2Fall-MiniLM-L6-v2``)
or not (``/models/BAAI/bge-small-en-v1.5`` works too). Answers and codes are
tei-manager's, but for two statuses that are not internal errors: a download
the Hub (or the network) failed answers 502 ``MODEL_DOWNLOAD_FAILED``, a
smoke test of a model not downloaded 409 ``MODEL_LOAD_FAILED`` (tei-manager:
500 both). A smoke test that ran and failed answers 200 with ``status:
failed`` and ``verification_error``, as tei-manager.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
from quart import Response
from quart_trio import QuartTrio

from ..models import (
    DownloadFailed,
    InvalidModelId,
    ModelBusy,
    ModelInfo,
    ModelNotDownloaded,
    ModelNotFound,
    RegistryStopped,
    TooManyModels,
)
from .bodies import ApiError, error_response, json_object
from .responses import json_response

__all__ = ["ModelControl", "ModelRegistration", "add_model_routes"]

#: A registration body is a model id: anything longer is not one.
MAX_BODY_BYTES = 64 * 1024


class ModelRegistration(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /models``'s body."""

    model_id: str


class ModelControl(Protocol):
    """What the routes need of the registry (`teisup.models.ModelService`)."""

    async def register(self, model_id: str) -> tuple[ModelInfo, bool]: ...

    async def get(self, model_id: str) -> ModelInfo: ...

    def all(self) -> list[ModelInfo]: ...

    async def download(self, model_id: str) -> ModelInfo: ...

    async def load(self, model_id: str) -> ModelInfo: ...


def _refusal(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFound):
        return ApiError(404, "MODEL_NOT_FOUND", str(exc))
    if isinstance(exc, ModelBusy):
        return ApiError(409, "MODEL_BUSY", str(exc))
    if isinstance(exc, ModelNotDownloaded):
        return ApiError(409, "MODEL_LOAD_FAILED", str(exc))
    if isinstance(exc, DownloadFailed):
        return ApiError(502, "MODEL_DOWNLOAD_FAILED", str(exc))
    if isinstance(exc, InvalidModelId):
        return ApiError(400, "VALIDATION_ERROR", f"Validation error: {exc}")
    if isinstance(exc, RegistryStopped):
        return ApiError(503, "BACKEND_UNAVAILABLE", str(exc))
    if isinstance(exc, TooManyModels):
        return ApiError(422, "MAX_MODELS_REACHED", str(exc))
    raise exc


async def _registration() -> ModelRegistration:
    data = await json_object(MAX_BODY_BYTES, "Validation error: the body must be a JSON object")
    if "model_id" not in data:
        raise ApiError(400, "MISSING_FIELD", "Missing required field: model_id")
    try:
        return msgspec.convert(data, ModelRegistration)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "VALIDATION_ERROR", f"Validation error: {exc}") from None


def add_model_routes(app: QuartTrio, models: Callable[[], ModelControl]) -> None:
    """Serve the registry routes on ``app``; ``models()`` is the registry (read per request)."""

    def route(
        op: Callable[..., Awaitable[Response]],
    ) -> Callable[..., Awaitable[Response]]:
        async def handler(**kwargs: str) -> Response:
            try:
                return await op(**kwargs)
            except Exception as exc:
                refusal = _refusal(exc)
            return error_response(refusal.status, refusal.code, str(refusal))

        handler.__name__ = op.__name__
        return handler

    @app.get("/models")
    @route
    async def list_models() -> Response:
        return json_response(models().all())

    @app.post("/models")
    @route
    async def register_model() -> Response:
        body = await _registration()
        info, created = await models().register(body.model_id)
        return json_response(info, 201 if created else 200)

    @app.get("/models/<path:model_id>")
    @route
    async def get_model(model_id: str) -> Response:
        return json_response(await models().get(model_id))

    @app.post("/models/<path:model_id>/download")
    @route
    async def download_model(model_id: str) -> Response:
        return json_response(await models().download(model_id))

    @app.post("/models/<path:model_id>/load")
    @route
    async def load_model(model_id: str) -> Response:
        return json_response(await models().load(model_id))
