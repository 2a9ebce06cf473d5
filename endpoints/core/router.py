"""Core/admin routes: health, models, load/unload, tokens, templates, permission."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from loguru import logger
from starlette.responses import JSONResponse, Response

from backends.base import LoadOptions
from endpoints.http.auth import Permission, permission_of, require_admin, require_api
from common.errors import BadRequestError, Dialect
from common.config.loader import ParleyConfig
from common.generation.prompts import chat_prompt
from common.models.loras import draft_options
from common.models.files import ModelFile
from common.models.manager import LoadedModel, ModelManager
from common.models.presets import PresetState, list_presets
from endpoints.http.streaming import dumps, sse_response
from endpoints.core.model_cards import card, health_entry, model_list
from endpoints.core.protocol import (
    ModelLoadRequest,
    ModelUnloadRequest,
    SamplerOverrideSwitchRequest,
    TemplateSwitchRequest,
    TokenDecodeRequest,
    TokenEncodeRequest,
)
from endpoints.http.deps import get_config, get_models, get_presets, lease_model
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute

router = APIRouter(
    tags=["Core"],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


@router.get("/health")
async def health(request: Request, models: ModelManager = Depends(get_models)) -> Response:
    """503 while the first model loads or the server drains; per model: state, leases, idle time and engine stats."""
    issues: list[dict[str, str]] = []
    status = "healthy"
    entries: dict[str, dict[str, Any]] = {name: health_entry(m) for name, m in models.loaded.items()}
    for name in models.loading:
        entries.setdefault(name, {"state": "loading"})
    for name in models.idle_unloaded:
        entries.setdefault(name, {"state": "unloaded_idle"})  # loaded again by the next request naming it
    lifecycle = getattr(request.app.state, "lifecycle", None)
    if lifecycle is not None and lifecycle.draining:
        status = "draining"
        issues.append({"time": _now(), "description": "The server is shutting down; it accepts no new generations."})
    elif not models.loaded and models.is_loading:
        status = "loading"
        issues.append({"time": _now(), "description": "A model is loading."})
    elif not models.loaded and not models.idle_unloaded:
        issues.append({"time": _now(), "description": "No model is loaded; POST /v1/model/load."})
    for name, entry in entries.items():
        if entry.get("failure"):
            status = "unhealthy" if status == "healthy" else status
            issues.append({"time": _now(), "description": f"Model '{name}' stopped after an engine failure "
                           f"({entry['failure']}); reload it with POST /v1/model/load, or restart the server."})
    code = 503 if status != "healthy" else 200
    # Live asyncio tasks: flat when idle; a count that grows with traffic is a leak (the soak test watches it).
    tasks = len(asyncio.all_tasks())
    return JSONResponse({"status": status, "issues": issues, "models": entries, "tasks": tasks}, status_code=code)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@router.get("/v1/models", dependencies=[Depends(require_api)])
@router.get("/v1/model/list", dependencies=[Depends(require_api)])
async def list_models(request: Request, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    """Loaded models; the whole model directory for the admin key, or for every key when any key may
    load models inline."""
    whole = (models.inline_loading and not models.inline_admin_only) or (
        await permission_of(request) is Permission.ADMIN
    )
    return {"object": "list", "data": await model_list(models, whole_directory=whole)}


@router.get("/v1/model", dependencies=[Depends(require_api)])
async def current_model(
    models: ModelManager = Depends(get_models),
    model: str | None = Query(None, alias="model", description="A model name; none: the default model."),
    name: str | None = Query(None, description="Same as model."),
) -> dict[str, Any]:
    """The default model's card, or the named model's (loaded or not)."""
    wanted = model or name
    if not wanted or wanted == "default" or wanted in models.dummy_names or wanted in models.loaded:
        resolved = models.get(wanted).name
        return await card(models, resolved, _file(models, resolved))
    entry = models.find(wanted)  # 404 naming the available models
    return await card(models, entry.name, entry)


def _file(models: ModelManager, name: str) -> ModelFile | None:
    return next((m for m in models.available() if m.name == name), None)


@router.post("/v1/model/load", dependencies=[Depends(require_admin)])
async def load_model(
    body: ModelLoadRequest,
    models: ModelManager = Depends(get_models),
    config: ParleyConfig = Depends(get_config),
) -> Response:
    """Load (or reload with new options): options settle as config < the model's parley.yml < this body."""
    entry = models.find(body.model_name)  # 400/404 before the stream starts
    overrides = {
        k: v
        for k, v in body.model_dump(exclude={"model_name", "backend"}, exclude_none=True).items()
        if k in LoadOptions.__dataclass_fields__
    }
    if body.prompt_template:
        models.template_by_name(body.prompt_template)  # fail fast on a bad name
    if body.mmproj is not None and body.mmproj.lower() != "none":
        name = body.mmproj
        if not name or "/" in name or "\\" in name or ".." in name or name.startswith(".") or "\x00" in name:
            raise BadRequestError(
                f"mmproj '{name[:100]}' must be a plain file name in the model's folder (no paths), or none.",
                param="mmproj",
            )
    if body.draft_model is not None:
        d = body.draft_model
        overrides.update(
            draft_options(Path(config.draft_model.draft_model_dir), d.draft_mode, d.draft_model_name,
                          d.draft_max_tokens, models.default_options)
        )
        if d.draft_adaptive is not None:
            overrides["draft_adaptive"] = d.draft_adaptive

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    steps = 100

    def progress(value: float) -> None:
        event = {"model_type": "model", "module": int(value * steps), "modules": steps, "status": "processing"}
        loop.call_soon_threadsafe(queue.put_nowait, event)

    task = asyncio.create_task(
        models.load(entry.name, overrides, progress, backend=body.backend, reload=True)
    )

    async def frames() -> AsyncIterator[str]:
        last = -1
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            event = getter.result()
            if event["module"] != last:
                last = event["module"]
                yield f"data: {dumps(event)}\n\n"
        await task  # raises the load's error as the stream's error frame
        yield f"data: {dumps({'model_type': 'model', 'module': steps, 'modules': steps, 'status': 'finished'})}\n\n"

    return sse_response(frames(), Dialect.OPENAI, done_marker=False)


@router.post("/v1/model/unload", dependencies=[Depends(require_admin)])
async def unload_model(body: ModelUnloadRequest | None = None, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    """Unload the named model (every model without a name) now; its running requests end with an error."""
    name = body.model_name if body else None
    unloaded = await models.unload(name)
    return {"unloaded": unloaded}


@router.post("/v1/token/encode", dependencies=[Depends(require_api)])
async def encode(body: TokenEncodeRequest, request: Request) -> dict[str, Any]:
    with await lease_model(request, body.model) as lease:
        return _encode(body, lease.model)


def _encode(body: TokenEncodeRequest, model: LoadedModel) -> dict[str, Any]:
    if body.messages is not None:
        text = chat_prompt(model, body.messages).text or ""
    elif body.text is not None:
        text = body.text
    else:
        raise BadRequestError("Send 'text' or 'messages' to encode.", param="text")
    add_bos = body.add_bos_token and model.info.add_bos_token
    tokens = model.engine.tokenize(text, add_bos=add_bos, special=body.encode_special_tokens)
    return {"tokens": tokens, "length": len(tokens)}


@router.post("/v1/token/decode", dependencies=[Depends(require_api)])
async def decode(body: TokenDecodeRequest, request: Request) -> dict[str, Any]:
    with await lease_model(request, body.model) as lease:
        return _decode(body, lease.model)


def _decode(body: TokenDecodeRequest, model: LoadedModel) -> dict[str, Any]:
    bad = next((t for t in body.tokens if not 0 <= t < model.info.n_vocab), None)
    if bad is not None:
        raise BadRequestError(f"Token id {bad} is outside the vocabulary (0..{model.info.n_vocab - 1}).", param="tokens")
    return {"text": model.engine.detokenize(body.tokens, special=body.decode_special_tokens)}


@router.get("/v1/templates", dependencies=[Depends(require_api)])
@router.get("/v1/template/list", dependencies=[Depends(require_api)])
async def templates(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    return {"object": "list", "data": models.templates()}


@router.post("/v1/template/switch", dependencies=[Depends(require_admin)])
async def switch_template(body: TemplateSwitchRequest, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    template = models.switch_template(body.prompt_template_name, body.model)
    logger.info("Chat template switched to {}", template.name)
    return {"prompt_template": template.name}


@router.post("/v1/template/unload", dependencies=[Depends(require_admin)])
async def unload_template(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    models.unload_template()
    model = models.get()
    return {"prompt_template": model.template.name if model.template else None}


@router.get("/v1/auth/permission")
async def auth_permission(request: Request) -> dict[str, str]:
    permission = await permission_of(request)
    return {"permission": permission.value}


@router.get("/props", dependencies=[Depends(require_api)])
async def props(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    model = models.get()
    stats = model.engine.stats()
    return {
        "total_slots": stats.slots_total,
        "chat_template": model.template.source if model.template else "",
        "model_path": model.info.path,
        "default_generation_settings": {"n_ctx": model.info.n_ctx, "model": model.name},
        "modalities": {"vision": "vision" in model.info.modalities, "audio": False},
        "build_info": "parley",
    }


@router.get("/v1/sampling/overrides", dependencies=[Depends(require_api)])
@router.get("/v1/sampling/override/list", dependencies=[Depends(require_api)])
async def sampling_overrides(presets: PresetState = Depends(get_presets)) -> dict[str, Any]:
    active = presets.active
    return {
        "selected_preset": active.name if active else None,
        "overrides": active.describe() if active else {},
        "presets": list_presets(presets.directory),
    }


@router.post("/v1/sampling/override/switch", dependencies=[Depends(require_admin)])
async def switch_sampling_override(
    body: SamplerOverrideSwitchRequest, presets: PresetState = Depends(get_presets)
) -> dict[str, Any]:
    if body.preset:
        preset = presets.switch(body.preset)
    elif body.overrides is not None:
        preset = presets.use_inline(body.overrides)
    else:
        raise BadRequestError("Send 'preset' (a name from /v1/sampling/overrides) or 'overrides'.", param="preset")
    logger.info("Sampler preset switched to {}", preset.name)
    return {"selected_preset": preset.name, "overrides": preset.describe()}


@router.post("/v1/sampling/override/unload", dependencies=[Depends(require_admin)])
async def unload_sampling_override(presets: PresetState = Depends(get_presets)) -> dict[str, Any]:
    presets.active = None
    return {"selected_preset": None}
