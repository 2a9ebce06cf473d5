"""LoRA adapters: list what is on disk and loaded, load a stack with scales, unload.

Adapters load onto one model (the default one unless `model` is named). The
scales given to /v1/lora/load become that model's active set, applied to every
request that does not pick its own with a `loras` field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from loguru import logger

from endpoints.http.auth import require_admin, require_api
from common.config.loader import ParleyConfig
from common.errors import Dialect
from common.models.loras import apply_lora_set, scan_loras
from common.models.manager import ModelManager
from endpoints.core.protocol import LoraLoadRequest, LoraUnloadRequest
from endpoints.http.deps import get_config, get_models
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute

router = APIRouter(tags=["LoRA"], route_class=StrictJSONRoute, responses=error_responses(Dialect.OPENAI))


def _card(name: str, scaling: float | None = None, **extra: Any) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "lora", "owned_by": "parley", **extra}
    if scaling is not None:
        card["scaling"] = scaling
    return card


@router.get("/v1/loras", dependencies=[Depends(require_api)])
async def active_loras(
    models: ModelManager = Depends(get_models),
    model: str | None = Query(None, description="A loaded model; none: the default model."),
) -> dict[str, Any]:
    """Adapters loaded on the model, with their scale in its active set (0: loaded, not applied)."""
    loaded = models.get(model)
    data = [_card(s.name, s.scaling, model=loaded.name) for s in loaded.engine.loras()]
    return {"object": "list", "data": data}


@router.get("/v1/lora/list", dependencies=[Depends(require_api)])
async def available_loras(config: ParleyConfig = Depends(get_config)) -> dict[str, Any]:
    """Adapters in the LoRA directory."""
    found = scan_loras(Path(config.lora.lora_dir))
    return {"object": "list", "data": [_card(f.name, size_bytes=f.size_bytes) for f in found]}


@router.post("/v1/lora/load", dependencies=[Depends(require_admin)])
async def load_loras(
    body: LoraLoadRequest,
    models: ModelManager = Depends(get_models),
    config: ParleyConfig = Depends(get_config),
) -> dict[str, Any]:
    """Load each adapter (if not loaded yet) and make exactly these scales the model's active set.

    Each name lands in `success` or `failure` (with the reason in `errors`); the active set is the
    adapters that loaded.
    """
    model = models.get(body.model)
    applied = await apply_lora_set(model.engine, Path(config.lora.lora_dir), [(c.name, c.scaling) for c in body.loras])
    logger.info("LoRA set on {}: {}", model.name, ", ".join(f"{n}@{s:g}" for n, s in applied.active) or "none")
    result: dict[str, Any] = {"success": [n for n, _ in applied.active], "failure": [n for n, _ in applied.failed]}
    if applied.failed:
        result["errors"] = dict(applied.failed)
    return result


@router.post("/v1/lora/unload", dependencies=[Depends(require_admin)])
async def unload_loras(body: LoraUnloadRequest | None = None, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    """Unload the named adapters (all without names); requests using them end with an error frame."""
    model = models.get(body.model if body else None)
    names = body.loras if body and body.loras else None
    unloaded = await model.engine.unload_loras(names)
    return {"unloaded": unloaded}
