"""OpenAI routes: thin; mapping and framing live beside them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import Dialect
from common.generation.hooks import GenerationHooks
from common.generation.images import ImagePolicy, resolve_message_images
from common.generation.pipeline import Generation, start_generation
from common.models.manager import ModelLease
from common.models.presets import PresetState
from endpoints.http.auth import require_api
from endpoints.http.deps import RouteDialect, get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.streaming import sse_response, until_disconnect
from endpoints.openai import serving
from endpoints.openai.mapping import chat_plan, completion_plan
from endpoints.openai.protocol import ChatCompletionRequest, CompletionRequest, lora_pairs

OPENAI = RouteDialect(Dialect.OPENAI)
OPENAI_CHAT = RouteDialect(Dialect.OPENAI, max_tokens_named="max_tokens (or max_completion_tokens)")

router = APIRouter(
    tags=["OpenAI"],
    dependencies=[Depends(OPENAI), Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


@router.post("/v1/chat/completions", dependencies=[Depends(OPENAI_CHAT)])
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
) -> Response:
    log_unknown_fields(body, "/v1/chat/completions")
    with await lease_model(request, body.model) as lease:
        return await _chat(body, request, lease, config, presets, hooks)


async def _chat(
    body: ChatCompletionRequest, request: Request, lease: ModelLease, config: ParleyConfig, presets: PresetState,
    hooks: GenerationHooks,
) -> Response:
    model = lease.model
    messages, images = await resolve_message_images(
        body.messages, ImagePolicy.from_config(config), vision="vision" in model.info.modalities, model_name=model.name
    )
    plan = chat_plan(body, model, config.model, model.preset(presets.active), messages=messages, images=images)
    generation = await start_generation(
        model, plan.prompt, plan.params, hooks=hooks, n=body.n, constraint=plan.constraint,
        loras=lora_pairs(body.loras), default_max_tokens=config.model.default_max_tokens,
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.chat_stream(
            generation, model.name, plan.options, include_usage=include_usage, want_logprobs=plan.want_logprobs
        )
        return sse_response(frames, Dialect.OPENAI, handles=generation.handles, on_close=lease.detach())
    work = serving.chat_response(generation, model.name, plan.options, want_logprobs=plan.want_logprobs)
    return JSONResponse(await until_disconnect(request, work, generation.handles))


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
) -> Response:
    log_unknown_fields(body, "/v1/completions")
    with await lease_model(request, body.model) as lease:
        return await _completions(body, request, lease, config, presets, hooks)


async def _completions(
    body: CompletionRequest, request: Request, lease: ModelLease, config: ParleyConfig, presets: PresetState,
    hooks: GenerationHooks,
) -> Response:
    model = lease.model
    plan = completion_plan(body, model, model.preset(presets.active))
    generations: list[Generation] = []
    try:
        for prompt in plan.prompts:
            generations.append(await start_generation(
                model, prompt, plan.params, hooks=hooks, n=body.n, constraint=plan.constraint,
                loras=lora_pairs(body.loras), default_max_tokens=config.model.default_max_tokens,
            ))
    except BaseException:
        for g in generations:
            g.cancel()
        raise
    want_logprobs = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.completion_stream(
            generations[0], model.name, include_usage=include_usage, want_logprobs=want_logprobs,
            echo_text=plan.echo_texts[0] if plan.echo_texts else "",
        )
        return sse_response(frames, Dialect.OPENAI, handles=generations[0].handles, on_close=lease.detach())
    every = [h for g in generations for h in g.handles]
    work = serving.completion_response(generations, model.name, plan.echo_texts, want_logprobs=want_logprobs)
    return JSONResponse(await until_disconnect(request, work, every))
