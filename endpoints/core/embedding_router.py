"""TabbyAPI's embedding-model admin routes: which embedding models exist, and loading or unloading them.

Embedding models live in the same model manager as chat models (LRU room-making,
keep_alive, leases); these routes only pick them out. `GET /v1/model/embedding`
is the default embedding model's card.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AliasChoices, ConfigDict, Field

from common.errors import BadRequestError, Dialect, NotFoundError
from common.models.manager import LoadedModel, ModelManager
from endpoints.http.auth import require_admin, require_api
from endpoints.http.deps import get_models, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel

router = APIRouter(tags=["Core"], route_class=StrictJSONRoute, responses=error_responses(Dialect.OPENAI))


class EmbeddingLoadRequest(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    embedding_model_name: ModelName = Field(validation_alias=AliasChoices("embedding_model_name", "model_name", "name"))
    embeddings_device: Literal["cpu", "cuda", "auto"] | None = None
    pooling: Literal["mean", "cls", "last", "rank"] | None = None
    max_seq_len: int | None = Field(None, ge=8)
    backend: Literal["llamacpp_embedding", "infinity"] | None = None


class EmbeddingUnloadRequest(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    embedding_model_name: ModelName | None = Field(
        None, validation_alias=AliasChoices("embedding_model_name", "model_name", "name")
    )


def _card(model: LoadedModel) -> dict[str, Any]:
    engine = model.engine
    return {
        "id": model.name, "object": "model", "owned_by": "parley", "state": "loaded",
        "task": getattr(engine, "task", "embed"), "backend": model.info.backend,
        "dimensions": getattr(engine, "dimensions", 0), "max_input_tokens": getattr(engine, "max_input_tokens", 0),
        "pooling": getattr(engine, "pooling", ""), "active_requests": model.active,
        "default": False,
    }


@router.get("/v1/model/embedding/list", dependencies=[Depends(require_api)])
async def list_embedding_models(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    loaded = models.loaded
    data = []
    for entry in models.available():
        task = models.task_of(entry)
        if task == "generate":
            continue
        if entry.name in loaded:
            item = _card(loaded[entry.name])
        else:
            state = "loading" if entry.name in models.loading else "available"
            item = {"id": entry.name, "object": "model", "owned_by": "parley", "state": state, "task": task}
        item["default"] = entry.name == models.default_embedding_name
        data.append(item)
    return {"object": "list", "data": data}


@router.get("/v1/model/embedding", dependencies=[Depends(require_api)])
async def current_embedding_model(models: ModelManager = Depends(get_models)) -> dict[str, Any]:
    name = models.default_embedding_name
    model = models.loaded.get(name) if name else None
    if model is None:
        raise NotFoundError("No embedding model is loaded. Load one with POST /v1/model/embedding/load.",
                            code="no_embedding_model")
    return _card(model) | {"default": True}


@router.post("/v1/model/embedding/load", dependencies=[Depends(require_admin)])
async def load_embedding_model(
    body: EmbeddingLoadRequest, request: Request, models: ModelManager = Depends(get_models)
) -> dict[str, Any]:
    """Load (or reload with these options) an embedding or rerank model; answers when it is ready."""
    log_unknown_fields(body, "/v1/model/embedding/load")
    entry = models.find(body.embedding_model_name)
    if models.task_of(entry) == "generate":
        raise BadRequestError(
            f"'{entry.name}' is a text generation model, not an embedding model. Load it with POST /v1/model/load, "
            "or name a sentence-transformers folder, a cross-encoder or an embedding GGUF.",
            param="embedding_model_name",
        )
    overrides = {"device": body.embeddings_device, "pooling": body.pooling, "max_seq_len": body.max_seq_len}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    reload = bool(overrides or body.backend) and entry.name in models.loaded
    model = await models.load(entry.name, overrides, backend=body.backend, reload=reload)
    return {"success": True, **_card(model), "default": model.name == models.default_embedding_name}


@router.post("/v1/model/embedding/unload", dependencies=[Depends(require_admin)])
async def unload_embedding_model(
    body: EmbeddingUnloadRequest | None = None, models: ModelManager = Depends(get_models)
) -> dict[str, Any]:
    """Unload the named embedding model (every embedding model without a name)."""
    name = body.embedding_model_name if body else None
    if name:
        model = models.loaded.get(name)
        if model is not None and not model.is_embedding:
            raise BadRequestError(f"'{name}' is a text generation model; unload it with POST /v1/model/unload.",
                                  param="embedding_model_name")
        return {"unloaded": await models.unload(name)}
    unloaded: list[str] = []
    for model in [m for m in models.loaded.values() if m.is_embedding]:
        unloaded += await models.unload(model.name)
    return {"unloaded": unloaded}
