"""The REST control plane (quart-trio on hypercorn's trio worker)."""

from .app import ApiError, ControlPlane, create_app
from .openapi import openapi_document

__all__ = ["ApiError", "ControlPlane", "create_app", "openapi_document"]
