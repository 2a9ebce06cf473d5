"""OpenAI routes: thin; mapping and framing live beside them."""

from __future__ import annotations

from fastapi import Depends
from starlette.responses import Response

from common.errors import Dialect
from common.generation.images import ImagePolicy, resolve_message_images
from common.generation.pipeline import start_generation
from endpoints.http.deps import RouteDialect, log_unknown_fields
from endpoints.http.route import GenerateDeps, answer, api_router, generate_deps, start_each
from endpoints.openai import serving
from endpoints.openai.mapping import chat_plan, completion_plan
from endpoints.openai.protocol import ChatCompletionRequest, CompletionRequest, lora_pairs

OPENAI = RouteDialect(Dialect.OPENAI)
OPENAI_CHAT = RouteDialect(Dialect.OPENAI, max_tokens_named="max_tokens (or max_completion_tokens)")

router = api_router(OPENAI, tags=["OpenAI"])


@router.post("/v1/chat/completions", dependencies=[Depends(OPENAI_CHAT)])
async def chat_completions(body: ChatCompletionRequest, deps: GenerateDeps = Depends(generate_deps)) -> Response:
    log_unknown_fields(body, "/v1/chat/completions")
    with await deps.lease(body.model) as lease:
        model = lease.model
        messages, images = await resolve_message_images(
            body.messages, ImagePolicy.from_config(deps.config), vision="vision" in model.info.modalities,
            model_name=model.name,
        )
        plan = chat_plan(body, model, deps.config.model, deps.preset(model), messages=messages, images=images)
        generation = await start_generation(
            model, plan.prompt, plan.params, hooks=deps.hooks, n=body.n, constraint=plan.constraint,
            loras=lora_pairs(body.loras), default_max_tokens=deps.default_max_tokens,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await answer(
            deps.request, lease, generation, stream=body.stream, dialect=Dialect.OPENAI,
            frames=lambda: serving.chat_stream(generation, model.name, plan.options, include_usage=include_usage,
                                               want_logprobs=plan.want_logprobs),
            result=lambda: serving.chat_response(generation, model.name, plan.options,
                                                 want_logprobs=plan.want_logprobs),
        )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, deps: GenerateDeps = Depends(generate_deps)) -> Response:
    log_unknown_fields(body, "/v1/completions")
    with await deps.lease(body.model) as lease:
        model = lease.model
        plan = completion_plan(body, model, deps.preset(model))
        generations = await start_each(
            start_generation(
                model, prompt, plan.params, hooks=deps.hooks, n=body.n, constraint=plan.constraint,
                loras=lora_pairs(body.loras), default_max_tokens=deps.default_max_tokens,
            )
            for prompt in plan.prompts
        )
        want_logprobs = body.logprobs is not None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await answer(
            deps.request, lease, generations, stream=body.stream, dialect=Dialect.OPENAI,
            frames=lambda: serving.completion_stream(
                generations[0], model.name, include_usage=include_usage, want_logprobs=want_logprobs,
                echo_text=plan.echo_texts[0] if plan.echo_texts else "",
            ),
            result=lambda: serving.completion_response(generations, model.name, plan.echo_texts,
                                                       want_logprobs=want_logprobs),
        )
