"""Ollama routes: thin; mapping and framing live beside them.

A request naming a model that is in the model directory but not loaded loads
it, as Ollama does; an empty prompt (or no messages) only loads it, and with
`keep_alive: 0` unloads it (once its running requests end). `keep_alive` on
any request sets how long the model stays loaded once idle (Ollama's
semantics; a negative value keeps it loaded).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from loguru import logger
from starlette.responses import JSONResponse, PlainTextResponse, Response

from backends.base import ImageInput
from endpoints.http.auth import require_admin
from common.config.loader import ParleyConfig
from common.formats.constraints import ConstraintSpec
from common.downloads.jobs import DownloadManager
from common.errors import APIError, BadRequestError, Dialect
from common.generation import embeddings
from common.generation.hooks import EmbeddingHooks
from common.generation.pipeline import start_generation
from common.generation.images import ImagePolicy, ImageSource, resolve
from common.models.manager import LoadedModel, ModelFile, ModelLease, ModelManager
from endpoints.http.streaming import ndjson_response
from endpoints.http.deps import RouteDialect, get_downloads, get_models, log_unknown_fields
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.route import GenerateDeps, answer, api_router, generate_deps
from endpoints.ollama import serving
from endpoints.ollama.mapping import (
    OllamaPlan,
    chat_messages,
    chat_plan,
    find_model_file,
    format_constraint,
    generate_plan,
    is_unload,
    keep_alive_seconds,
    image_sources,
    parse_pull_name,
)
from endpoints.ollama.protocol import ChatRequest, EmbedRequest, GenerateRequest, KeepAlive, PullRequest, ShowRequest

OLLAMA_VERSION = "0.6.3"
# Unknown paths under /api/ answer in Ollama's shape too (KoboldAI claims its longer prefixes).
OLLAMA = RouteDialect(Dialect.OLLAMA, max_tokens="options.num_predict", claims=("/api/",))

router = APIRouter(tags=["Ollama"], route_class=StrictJSONRoute)  # the probe at `/`, without a key
api = api_router(OLLAMA, prefix="/api")


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    """Ollama clients probe this before anything else; it needs no key."""
    return PlainTextResponse("Ollama is running")


async def _use_model(
    models: ModelManager, entry: ModelFile, timing: serving.Timing, keep_alive: KeepAlive
) -> ModelLease:
    """A lease on the named model, loading it first when it is not loaded (Ollama semantics)."""
    seconds = keep_alive_seconds(keep_alive)
    loaded = entry.name in models.loaded
    started = time.perf_counter()
    lease = await models.acquire(entry.name, always_load=True)
    if not loaded:
        timing.load_ns = int((time.perf_counter() - started) * 1e9)
    if keep_alive is not None:
        await models.set_keep_alive(lease.model, seconds)
    return lease


async def _images(sources: list[ImageSource], model: LoadedModel, config: ParleyConfig) -> list[ImageInput]:
    return await resolve(
        sources, ImagePolicy.from_config(config), vision="vision" in model.info.modalities, model_name=model.name
    )


async def _run(
    lease: ModelLease, plan: OllamaPlan, spec: ConstraintSpec | None, deps: GenerateDeps, timing: serving.Timing,
    *, stream: bool, chat: bool,
) -> Response:
    model = lease.model
    generation = await start_generation(
        model, plan.prompt, plan.params, hooks=deps.hooks, constraint=spec, default_max_tokens=deps.default_max_tokens,
    )
    return await answer(
        deps.request, lease, generation, stream=stream, dialect=Dialect.OLLAMA,
        frames=lambda: serving.generation_stream(generation, model.name, timing, plan.options, chat=chat),
        result=lambda: serving.generation_response(generation, model.name, timing, plan.options, chat=chat),
    )


async def _unload(models: ModelManager, name: str, *, chat: bool) -> JSONResponse:
    """An empty request with `keep_alive: 0`: unload the model once its running requests end."""
    await models.unload_when_idle(name)
    return JSONResponse(serving.status_body(name, "unload", chat=chat))


@api.post("/generate")
async def generate(
    body: GenerateRequest, models: ModelManager = Depends(get_models), deps: GenerateDeps = Depends(generate_deps)
) -> Response:
    route = "/api/generate"
    log_unknown_fields(body, route)
    timing = serving.Timing()
    entry = find_model_file(models, body.model)
    if not body.prompt and is_unload(body.keep_alive):
        return await _unload(models, entry.name, chat=False)
    if body.suffix:
        raise BadRequestError(
            "suffix is not supported for this model: send the whole prompt without 'suffix'.", param="suffix"
        )
    spec = format_constraint(body.format)
    if body.template:
        logger.info("{}: ignoring 'template'; the model's chat template applies (use raw=true for your own)", route)
    if body.context:
        logger.info("{}: ignoring 'context'; send the conversation to /api/chat instead", route)
    with await _use_model(models, entry, timing, body.keep_alive) as lease:
        if not body.prompt:
            return JSONResponse(serving.status_body(entry.name, "load", chat=False))
        images = await _images(image_sources(body.images, "images"), lease.model, deps.config)
        plan = generate_plan(body, lease.model, deps.config.model, deps.preset(lease.model), images)
        return await _run(lease, plan, spec, deps, timing, stream=body.stream, chat=False)


@api.post("/chat")
async def chat(
    body: ChatRequest, models: ModelManager = Depends(get_models), deps: GenerateDeps = Depends(generate_deps)
) -> Response:
    log_unknown_fields(body, "/api/chat")
    timing = serving.Timing()
    entry = find_model_file(models, body.model)
    if not body.messages and is_unload(body.keep_alive):
        return await _unload(models, entry.name, chat=True)
    messages, sources = chat_messages(body.messages, entry.name)
    spec = format_constraint(body.format)
    with await _use_model(models, entry, timing, body.keep_alive) as lease:
        if not messages:
            return JSONResponse(serving.status_body(entry.name, "load", chat=True))
        images = await _images(sources, lease.model, deps.config)
        plan = chat_plan(body, messages, lease.model, deps.config.model, deps.preset(lease.model), images)
        return await _run(lease, plan, spec, deps, timing, stream=body.stream, chat=True)


@api.get("/tags")
async def tags(models: ModelManager = Depends(get_models)) -> JSONResponse:
    return JSONResponse(await serving.tags_body(models))


@api.post("/show")
async def show(body: ShowRequest, models: ModelManager = Depends(get_models)) -> JSONResponse:
    log_unknown_fields(body, "/api/show")
    if body.verbose:
        logger.debug("/api/show: verbose=true; token arrays are still left out of model_info")
    return JSONResponse(await serving.show_body(models, find_model_file(models, body.model)))


@api.get("/ps")
async def ps(models: ModelManager = Depends(get_models)) -> JSONResponse:
    return JSONResponse(await serving.ps_body(models))


@api.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_VERSION})


@api.post("/embed")
async def embed(
    body: EmbedRequest, models: ModelManager = Depends(get_models), hooks: EmbeddingHooks = Depends(request_hooks)
) -> JSONResponse:
    """Vectors for `input` (a string or a list); a request without input only loads the model."""
    log_unknown_fields(body, "/api/embed")
    timing = serving.Timing()
    with await _use_embedding_model(models, body, timing) as lease:
        if body.input is None:
            return JSONResponse(serving.embed_body(lease.model.name, None, timing))
        result = await embeddings.embed(lease.model, body.input, hooks=hooks, truncate=body.truncate)
        return JSONResponse(serving.embed_body(lease.model.name, result, timing))


@api.post("/embeddings")
async def embeddings_legacy(
    body: EmbedRequest, models: ModelManager = Depends(get_models), hooks: EmbeddingHooks = Depends(request_hooks)
) -> JSONResponse:
    """The older route: one `prompt`, one `embedding`; an empty prompt only loads the model."""
    log_unknown_fields(body, "/api/embeddings")
    with await _use_embedding_model(models, body, serving.Timing()) as lease:
        if body.prompt is None or body.prompt == "":
            return JSONResponse({"embedding": []})
        if not isinstance(body.prompt, str):
            raise BadRequestError("`prompt` must be a string; send a list of texts to /api/embed.", param="prompt")
        result = await embeddings.embed(lease.model, body.prompt, hooks=hooks, field="prompt", truncate=body.truncate)
        return JSONResponse({"embedding": result.vectors[0].tolist()})


async def _use_embedding_model(models: ModelManager, body: EmbedRequest, timing: serving.Timing) -> ModelLease:
    """A lease on the named embedding model, loaded on demand as Ollama does; keep_alive applies to it.
    A name that is not here is a 404, as on /api/chat and /api/generate."""
    seconds = keep_alive_seconds(body.keep_alive)
    started = time.perf_counter()
    before = set(models.loaded)
    # The names the other Ollama routes resolve (`name:latest`, pulled repos); an unknown one is their 404.
    # No model at all means the default embedding model.
    name = find_model_file(models, body.model).name if body.model else None
    lease = await models.acquire_embedding(name, always_load=True)
    if lease.model.name not in before:
        timing.load_ns = int((time.perf_counter() - started) * 1e9)
    if body.keep_alive is not None:
        await models.set_keep_alive(lease.model, seconds)
    return lease


@api.post("/pull", dependencies=[Depends(require_admin)])
async def pull(body: PullRequest, downloads: DownloadManager = Depends(get_downloads)) -> Response:
    """Download a GGUF repository from Hugging Face into the model directory (admin key)."""
    log_unknown_fields(body, "/api/pull")
    req = parse_pull_name(body.model)
    if body.insecure:
        logger.info("/api/pull: 'insecure' has no effect; Hugging Face is always reached over HTTPS")
    if body.stream:
        return ndjson_response(serving.pull_stream(downloads, req))
    await serving.run_pull(downloads, req)
    return JSONResponse({"status": "success"})


def _not_supported(operation: str) -> APIError:
    return APIError(
        f"{operation} is not supported by this server: models are GGUF files in the model directory. "
        "Copy, rename or delete the files there instead (they are picked up without a restart), "
        "or pull from Hugging Face with POST /api/pull.",
        status=501, code="not_implemented",
    )


@api.post("/copy")
async def copy() -> Response:
    raise _not_supported("Copying a model")


@api.delete("/delete")
async def delete() -> Response:
    raise _not_supported("Deleting a model")


@api.post("/create")
async def create() -> Response:
    raise _not_supported("Creating a model")


@api.post("/push")
async def push() -> Response:
    raise _not_supported("Pushing a model")


@api.head("/blobs/{digest}")
@api.post("/blobs/{digest}")
async def blobs(digest: str) -> Response:
    raise _not_supported("Uploading a blob")


routers = (router, api)  # the app includes both (endpoints/app.py), recording each route's dialect
