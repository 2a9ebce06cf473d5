"""FastAPI dependencies: the per-app objects routers need, read from app.state."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from loguru import logger
from pydantic import BaseModel

from endpoints.http.auth import Permission, permission_of
from common.config.loader import ParleyConfig
from common.downloads.jobs import DownloadManager
from common.models.manager import ModelLease, ModelManager
from common.models.presets import PresetState


def get_models(request: Request) -> ModelManager:
    return request.app.state.models


def get_downloads(request: Request) -> DownloadManager:
    return request.app.state.downloads


async def lease_model(request: Request, name: str | None, *, always_load: bool = False) -> ModelLease:
    """A lease on the model a request names (loading it inline when the config allows).

    Use as `with await lease_model(request, body.model) as lease:`; a streaming
    response takes the release over with `on_close=lease.detach()`.
    """
    models: ModelManager = request.app.state.models
    admin = (
        not models.inline_loading or not models.inline_admin_only
        or await permission_of(request) is Permission.ADMIN
    )
    return await models.acquire(name, admin=admin, always_load=always_load)


def get_presets(request: Request) -> PresetState:
    return request.app.state.presets


def get_config(request: Request) -> ParleyConfig:
    return request.app.state.config


def log_unknown_fields(body: BaseModel, route: str) -> None:
    """Unknown request fields are accepted (clients send many) but noted once per request."""
    extra: dict[str, Any] | None = body.model_extra
    if extra:
        logger.info("{}: ignoring unknown fields {}", route, ", ".join(sorted(extra)))
