"""OpenAI routes: thin; mapping and framing live beside them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from common.auth import require_api
from common.config import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation import chat_prompt, fit_params, submit_choices, text_prompt
from common.models import ModelManager
from common.streaming import sse_response, until_disconnect
from endpoints.deps import get_config, get_models, log_unknown_fields
from endpoints.openai import serving
from endpoints.openai.mapping import to_sampling_params
from endpoints.openai.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter(tags=["OpenAI"], dependencies=[Depends(require_api)])


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    models: ModelManager = Depends(get_models),
    config: ParleyConfig = Depends(get_config),
) -> Response:
    log_unknown_fields(body, "/v1/chat/completions")
    model = models.get(body.model)
    template_vars = {**(body.chat_template_kwargs or {}), **(body.template_vars or {})}
    prompt = chat_prompt(
        model,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools,
        template_vars=template_vars or None,
        response_prefix=body.response_prefix,
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = to_sampling_params(body, max_tokens=body.max_completion_tokens or body.max_tokens, logprobs=logprobs)
    params = fit_params(model, prompt, params, config.model.default_max_tokens)
    handles = submit_choices(model, prompt, params, body.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.chat_stream(handles, model.name, include_usage=include_usage)
        return sse_response(frames, Dialect.OPENAI, handles=handles)
    return JSONResponse(await until_disconnect(request, serving.chat_response(handles, model.name), handles))


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    models: ModelManager = Depends(get_models),
    config: ParleyConfig = Depends(get_config),
) -> Response:
    log_unknown_fields(body, "/v1/completions")
    model = models.get(body.model)
    raw = body.prompt
    if isinstance(raw, str):
        prompts: list[str | list[int]] = [raw]
    elif raw and all(isinstance(p, int) for p in raw):
        prompts = [list(raw)]  # type: ignore[arg-type]
    else:
        prompts = list(raw)  # type: ignore[arg-type]
    if not prompts:
        raise BadRequestError("'prompt' must not be empty.", param="prompt")
    if body.stream and len(prompts) > 1:
        raise BadRequestError("Streaming supports one prompt per request; send the prompts separately.", param="prompt")
    logprobs = body.logprobs
    base = to_sampling_params(body, max_tokens=body.max_tokens, logprobs=logprobs)
    groups = []
    echo_texts: list[str] = []
    try:
        for p in prompts:
            prompt = text_prompt(model, p, add_bos=body.add_bos_token)
            params = fit_params(model, prompt, base, config.model.default_max_tokens)
            groups.append(submit_choices(model, prompt, params, body.n))
            if body.echo:
                echo_texts.append(prompt.text if prompt.text is not None else model.engine.detokenize(prompt.tokens))
    except BaseException:
        for g in groups:
            for h in g:
                h.cancel()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.completion_stream(
            groups[0], model.name, include_usage=include_usage, echo_text=echo_texts[0] if echo_texts else ""
        )
        return sse_response(frames, Dialect.OPENAI, handles=groups[0])
    every = [h for g in groups for h in g]
    work = serving.completion_response(groups, model.name, echo_texts)
    return JSONResponse(await until_disconnect(request, work, every))
