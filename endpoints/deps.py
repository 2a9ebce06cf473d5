"""FastAPI dependencies: the per-app objects routers need, read from app.state."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from loguru import logger
from pydantic import BaseModel

from common.config import ParleyConfig
from common.download_jobs import DownloadManager
from common.models import ModelManager
from common.presets import PresetState


def get_models(request: Request) -> ModelManager:
    return request.app.state.models


def get_downloads(request: Request) -> DownloadManager:
    return request.app.state.downloads


def get_presets(request: Request) -> PresetState:
    return request.app.state.presets


def get_config(request: Request) -> ParleyConfig:
    return request.app.state.config


def log_unknown_fields(body: BaseModel, route: str) -> None:
    """Unknown request fields are accepted (clients send many) but noted once per request."""
    extra: dict[str, Any] | None = body.model_extra
    if extra:
        logger.info("{}: ignoring unknown fields {}", route, ", ".join(sorted(extra)))
