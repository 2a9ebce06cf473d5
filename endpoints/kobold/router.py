"""KoboldAI routes (KoboldCpp compatible, as SillyTavern and KoboldAI Lite use them): thin.

Mapping lives in mapping.py, framing in serving.py, the genkey registry behind
abort and check in genkeys.py. Every route needs an API key, like the OpenAI
routes; errors render as Kobold's `{"detail": {"msg", "type", "param"}}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from loguru import logger
from starlette.responses import JSONResponse, Response

from endpoints.http.auth import AuthManager
from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.images import ImagePolicy, resolve
from common.generation.pipeline import Generation, start_generation
from common.generation.prompts import text_prompt, tokenize_images
from common.models.manager import ModelLease
from endpoints.http.streaming import EventStream, event_stream_200, sse_response, until_disconnect
from common.generation import embeddings
from common.generation.hooks import EmbeddingHooks
from endpoints.http.deps import RouteDialect, get_config, lease_embedding_model, lease_model, log_unknown_fields
from endpoints.openai.embedding_serving import embeddings_body
from endpoints.http.request_context import request_hooks
from endpoints.http.route import GenerateDeps, api_router, generate_deps
from endpoints.kobold import serving
from endpoints.kobold.genkeys import AbortOutcome, GenEntry, GenRegistry, get_registry, owner_of
from endpoints.kobold.mapping import default_max_length, generate_plan, image_sources, note_unapplied
from endpoints.kobold.protocol import (
    DetokenizeRequest,
    GenerateRequest,
    GenkeyRequest,
    KoboldEmbeddingRequest,
    TokenizeRequest,
)

# Unknown paths under KoboldAI's prefixes answer in its shape too.
KOBOLD = RouteDialect(Dialect.KOBOLD, max_tokens="max_length", claims=("/api/v1/", "/api/extra/", "/api/latest"))

router = api_router(KOBOLD, tags=["KoboldAI"])

KOBOLD_API_VERSION = "1.2.5"
# A recent KoboldCpp: clients enable streaming, grammar, min_p and tokenization from 1.x versions.
KOBOLDCPP_VERSION = "1.80"


# -- info ---------------------------------------------------------------------
@router.get("/api/v1/model")
async def model_name(request: Request) -> dict[str, str]:
    with await lease_model(request, None) as lease:  # the default model (brought back if idle-unloaded)
        return {"result": f"koboldcpp/{lease.model.name}"}


@router.get("/api/v1/info/version")
async def api_version() -> dict[str, str]:
    return {"result": KOBOLD_API_VERSION}


@router.get("/api/extra/version")
async def server_version(request: Request) -> dict[str, Any]:
    auth = getattr(request.app.state, "auth", None)
    protected = isinstance(auth, AuthManager) and not auth.disabled
    return {
        "result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": protected,
        "txt2img": False, "vision": False, "transcribe": False, "multiplayer": False,
        "websearch": False, "tts": False,
        "embeddings": any(m.is_embedding for m in request.app.state.models.loaded.values()),
    }


@router.post("/api/extra/embeddings")
async def embeddings_route(
    body: KoboldEmbeddingRequest, request: Request, hooks: EmbeddingHooks = Depends(request_hooks)
) -> JSONResponse:
    """KoboldCpp's embeddings (SillyTavern's vector storage): OpenAI's answer shape; long inputs are cut."""
    log_unknown_fields(body, "/api/extra/embeddings")
    with await lease_embedding_model(request, body.model) as lease:
        result = await embeddings.embed(lease.model, body.input, hooks=hooks, truncate=body.truncate)
        return JSONResponse(embeddings_body(result, lease.model.name))


@router.get("/api/v1/config/max_context_length")
@router.get("/api/extra/true_max_context_length")
async def max_context_length(request: Request) -> dict[str, int]:
    with await lease_model(request, None) as lease:
        return {"value": lease.model.info.n_ctx}


@router.get("/api/v1/config/max_length")
async def max_length(config: ParleyConfig = Depends(get_config)) -> dict[str, int]:
    return {"value": default_max_length(config.model.default_max_tokens, config.limits.max_output_tokens)}


# -- generation -----------------------------------------------------------------
async def _start(
    body: GenerateRequest, lease: ModelLease, deps: GenerateDeps, registry: GenRegistry, route: str
) -> tuple[Generation, GenEntry]:
    """Map and start the request; register it for abort and check."""
    log_unknown_fields(body, route)
    note_unapplied(body, route)
    model, config = lease.model, deps.config
    default_length = default_max_length(config.model.default_max_tokens, config.limits.max_output_tokens)
    prompt = None
    sources = image_sources(body)
    if sources:
        images = await resolve(
            sources, ImagePolicy.from_config(config), vision="vision" in model.info.modalities, model_name=model.name
        )
        prompt = await tokenize_images(model, text_prompt(model, body.prompt, truncatable=True, images=images))
    plan = generate_plan(body, model, default_length=default_length, preset=deps.preset(model), prompt=prompt)
    generation = await start_generation(model, plan.prompt, plan.params, hooks=deps.hooks, n=body.n,
                                        constraint=plan.constraint)
    entry = registry.start(owner_of(deps.request), body.genkey, generation.handles)
    if not body.quiet:
        logger.info(
            "{}: genkey {}, {} prompt tokens, max_length {}{}", route, entry.genkey, len(plan.prompt.tokens),
            plan.params.max_tokens, ", grammar" if plan.constraint is not None else "",
        )
    return generation, entry


@router.post("/api/v1/generate")
async def generate(
    body: GenerateRequest, registry: GenRegistry = Depends(get_registry), deps: GenerateDeps = Depends(generate_deps)
) -> Response:
    with await deps.lease(None) as lease:
        generation, entry = await _start(body, lease, deps, registry, "/api/v1/generate")
        work = serving.generate_response(generation, entry, registry, trim_stop=body.trim_stop)
        return JSONResponse(await until_disconnect(deps.request, work))


@router.post(
    "/api/extra/generate/stream", response_class=EventStream,
    responses=event_stream_200("Server-sent events: `event: message` frames of `{token, finish_reason}`; a "
                               "failure ends the stream with an `event: error` frame in KoboldAI's error shape."),
)
async def generate_stream(
    body: GenerateRequest, registry: GenRegistry = Depends(get_registry), deps: GenerateDeps = Depends(generate_deps)
) -> Response:
    if body.n != 1:
        raise BadRequestError("Streaming generates one answer; send n=1 or use /api/v1/generate.", param="n")
    with await deps.lease(None) as lease:
        generation, entry = await _start(body, lease, deps, registry, "/api/extra/generate/stream")
        frames = serving.generate_stream(generation, entry, registry, trim_stop=body.trim_stop)
        return sse_response(frames, Dialect.KOBOLD, done_marker=False, handles=generation.handles,
                            on_close=lease.detach())


@router.post("/api/extra/abort")
async def abort(
    request: Request,
    body: GenkeyRequest | None = None,
    registry: GenRegistry = Depends(get_registry),
) -> dict[str, str]:
    """Like KoboldCpp: success "true" only when something was aborted; "done" "false" for an unknown genkey."""
    genkey = body.genkey if body else None
    outcome = await registry.abort(owner_of(request), genkey)
    logger.info("/api/extra/abort genkey {}: {}", genkey or "(latest)", outcome.value)
    return {
        "success": "true" if outcome is AbortOutcome.ABORTED else "false",
        "done": "false" if outcome is AbortOutcome.UNKNOWN else "true",
    }


@router.get("/api/extra/generate/check")
@router.post("/api/extra/generate/check")
async def check(
    request: Request,
    body: GenkeyRequest | None = None,
    registry: GenRegistry = Depends(get_registry),
) -> dict[str, Any]:
    """The text generated so far (or the final text, for a short while after the end); "" when unknown."""
    entry = registry.find(owner_of(request), body.genkey if body else None)
    return {"results": [{"text": entry.text if entry else ""}]}


# -- tokens -------------------------------------------------------------------------
@router.post("/api/extra/tokencount")
@router.post("/api/extra/tokenize")
async def tokencount(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    with await lease_model(request, None) as lease:
        model = lease.model
        if body.special:
            ids = text_prompt(model, body.prompt, truncatable=True).tokens  # counted as /generate would send it
        else:
            ids = model.engine.tokenize(body.prompt, add_bos=False, special=True)
        return {"value": len(ids), "ids": ids}


@router.post("/api/extra/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    with await lease_model(request, None) as lease:
        model = lease.model
        info = model.info
        bad = next((t for t in body.ids if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise BadRequestError(
                f"Token id {bad} is outside the vocabulary (0..{info.n_vocab - 1}); send ids from /api/extra/tokenize.",
                param="ids",
            )
        ids = body.ids
        if ids and info.add_bos_token and ids[0] == info.bos_token_id:
            ids = ids[1:]  # the BOS tokencount adds is not part of the text
        return {"result": model.engine.detokenize(ids, special=True), "success": True}
