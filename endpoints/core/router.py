"""Core/admin routes: health, models, load/unload, tokens, templates, permission."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from loguru import logger
from starlette.responses import JSONResponse, Response

from backends.base import LoadOptions
from common.auth import Permission, permission_of, require_admin, require_api
from common.errors import BadRequestError, Dialect
from common.generation import chat_prompt
from common.models import LoadedModel, ModelManager
from common.presets import PresetState, list_presets
from common.streaming import dumps, sse_response
from endpoints.core.protocol import (
    ModelLoadRequest,
    ModelUnloadRequest,
    SamplerOverrideSwitchRequest,
    TemplateSwitchRequest,
    TokenDecodeRequest,
    TokenEncodeRequest,
)
from endpoints.deps import get_models, get_presets
from endpoints.error_docs import error_responses
from endpoints.json_body import StrictJSONRoute

router = APIRouter(
    tags=["Core"],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


def _card(model: LoadedModel) -> dict[str, Any]:
    info = model.info
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.loaded_at),
        "owned_by": "parley",
        "parameters": {
            **info.load_options,
            "backend": info.backend,
            "prompt_template": model.template.name if model.template else None,
            "prompt_template_content": model.template.source if model.template else None,
            "n_ctx_train": info.n_ctx_train,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "parameter_count": info.parameter_count,
            "size_bytes": info.size_bytes,
        },
    }


@router.get("/health")
async def health(models: ModelManager = Depends(get_models)) -> Response:
    issues: list[dict[str, str]] = []
    status = "healthy"
    if models.is_loading:
        status = "loading"
        issues.append({"time": _now(), "description": "A model is loading."})
    elif not models.loaded:
        issues.append({"time": _now(), "description": "No model is loaded; POST /v1/model/load."})
    engines = {}
    for name, model in models.loaded.items():
        st = model.engine.stats()
        engines[name] = {
            "slots_total": st.slots_total,
            "slots_active": st.slots_active,
            "queue_depth": st.queue_depth,
            "kv_cells_total": st.kv_cells_total,
            "kv_cells_used": st.kv_cells_used,
            "kv_cells_cached": st.cached_prefix_tokens,
            "requests_finished": st.requests_finished,
            "tokens_generated": st.tokens_generated,
        }
    code = 503 if status != "healthy" else 200
    # Live asyncio tasks: flat when idle; a count that grows with traffic is a leak (the soak test watches it).
    tasks = len(asyncio.all_tasks())
    return JSONResponse({"status": status, "issues": issues, "models": engines, "tasks": tasks}, status_code=code)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@router.get("/v1/models", dependencies=[Depends(require_api)])
@router.get("/v1/model/list", dependencies=[Depends(require_api)])
async def list_models(request: Request, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    permission = await permission_of(request)
    loaded = models.loaded
    data = [_card(m) for m in loaded.values()]
    if permission is Permission.ADMIN:
        for f in models.available():
            if f.name not in loaded:
                data.append({
                    "id": f.name, "object": "model", "created": int(f.modified), "owned_by": "parley",
                    "parameters": {"format": f.format, "size_bytes": f.size_bytes, "loaded": False},
                })
    return {"object": "list", "data": data}


@router.get("/v1/model", dependencies=[Depends(require_api)])
async def current_model(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    return _card(models.get())


@router.post("/v1/model/load", dependencies=[Depends(require_admin)])
async def load_model(body: ModelLoadRequest, models: ModelManager = Depends(get_models)) -> Response:
    entry = models.find(body.model_name)  # 400/404 before the stream starts
    changes = {
        k: v
        for k, v in body.model_dump(exclude={"model_name", "backend"}, exclude_none=True).items()
        if k in LoadOptions.__dataclass_fields__
    }
    options = replace(models.default_options, **changes)
    if body.prompt_template:
        models.template_by_name(body.prompt_template)  # fail fast on a bad name
    if entry.name in models.loaded:
        await models.unload(entry.name)  # a load of a loaded model reloads it with the new options

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    steps = 100

    def progress(value: float) -> None:
        event = {"model_type": "model", "module": int(value * steps), "modules": steps, "status": "processing"}
        loop.call_soon_threadsafe(queue.put_nowait, event)

    task = asyncio.create_task(models.load(entry.name, options, progress, backend=body.backend))

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
    name = body.model_name if body else None
    unloaded = await models.unload(name)
    return {"unloaded": unloaded}


@router.post("/v1/token/encode", dependencies=[Depends(require_api)])
async def encode(body: TokenEncodeRequest, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    model = models.get(body.model)
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
async def decode(body: TokenDecodeRequest, models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    model = models.get(body.model)
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
