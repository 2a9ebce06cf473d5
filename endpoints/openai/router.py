"""OpenAI routes: thin; mapping and framing live beside them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from endpoints.http.auth import require_api
from common.formats.output import OutputOptions
from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.fim import fim_prompt, has_fim
from common.generation.pipeline import chat_prompt, compile_constraint, fit_params, submit_choices, text_prompt
from common.models.manager import ModelLease
from common.models.presets import PresetState
from endpoints.http.streaming import sse_response, until_disconnect
from endpoints.http.deps import get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.openai import serving
from endpoints.openai.mapping import chat_constraint, constraint_spec, to_sampling_params
from endpoints.openai.protocol import ChatCompletionRequest, CompletionRequest, lora_pairs

router = APIRouter(
    tags=["OpenAI"],
    dependencies=[Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
) -> Response:
    log_unknown_fields(body, "/v1/chat/completions")
    with await lease_model(request, body.model) as lease:
        return await _chat(body, request, lease, config, presets)


async def _chat(
    body: ChatCompletionRequest, request: Request, lease: ModelLease, config: ParleyConfig, presets: PresetState
) -> Response:
    model = lease.model
    template_vars = {**(body.chat_template_kwargs or {}), **(body.template_vars or {})}
    if body.reasoning_effort:
        template_vars.setdefault("reasoning_effort", body.reasoning_effort)
    prompt = chat_prompt(
        model,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools if body.tool_choice != "none" else None,
        template_vars=template_vars or None,
        response_prefix=body.response_prefix,
    )
    mc = config.model
    options = OutputOptions.for_request(
        prompt_text=prompt.text,
        template_source=model.template.source if model.template else None,
        tools=body.tools,
        tool_choice=body.tool_choice,
        reasoning=mc.reasoning_parser,
        start=mc.reasoning_start_marker,
        end=mc.reasoning_end_marker,
        tool_format=mc.tool_format,
    )
    spec = chat_constraint(body, options.tool_format)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    preset = model.preset(presets.active)
    params = to_sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, preset=preset)
    if options.tool_format is not None:
        params = params.with_updates(skip_special_tokens=False)  # some formats mark calls with special tokens
    params = fit_params(model, prompt, params, mc.default_max_tokens)
    constraint = await compile_constraint(model, spec)
    handles = submit_choices(model, prompt, params, body.n, constraint, lora_pairs(body.loras))
    want_logprobs = logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.chat_stream(
            handles, model.name, options, include_usage=include_usage, want_logprobs=want_logprobs
        )
        return sse_response(frames, Dialect.OPENAI, handles=handles, on_close=lease.detach())
    work = serving.chat_response(handles, model.name, options, want_logprobs=want_logprobs)
    return JSONResponse(await until_disconnect(request, work, handles))


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
) -> Response:
    log_unknown_fields(body, "/v1/completions")
    with await lease_model(request, body.model) as lease:
        return await _completions(body, request, lease, config, presets)


async def _completions(
    body: CompletionRequest, request: Request, lease: ModelLease, config: ParleyConfig, presets: PresetState
) -> Response:
    model = lease.model
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
    # An empty suffix on a model without FIM is a plain completion (some clients always send one).
    fim = body.suffix is not None and (body.suffix != "" or has_fim(model))
    if fim and not (len(prompts) == 1 and isinstance(prompts[0], str)):
        raise BadRequestError(
            "'suffix' (fill-in-the-middle) takes one text prompt, the code before the cursor; "
            "send one string as 'prompt', or the prompts in separate requests.",
            param="prompt",
        )
    preset = model.preset(presets.active)
    base = to_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs, preset=preset)
    constraint = await compile_constraint(model, constraint_spec(body, body.response_format))
    groups = []
    echo_texts: list[str] = []
    try:
        for p in prompts:
            if fim and isinstance(p, str):
                prompt = fim_prompt(model, p, body.suffix or "", add_bos=body.add_bos_token)
            else:
                prompt = text_prompt(model, p, add_bos=body.add_bos_token)
            params = fit_params(model, prompt, base, config.model.default_max_tokens)
            groups.append(submit_choices(model, prompt, params, body.n, constraint, lora_pairs(body.loras)))
            if body.echo:
                echo_texts.append(prompt.text if prompt.text is not None else model.engine.detokenize(prompt.tokens))
    except BaseException:
        for g in groups:
            for h in g:
                h.cancel()
        raise
    want_logprobs = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = serving.completion_stream(
            groups[0], model.name, include_usage=include_usage, want_logprobs=want_logprobs,
            echo_text=echo_texts[0] if echo_texts else "",
        )
        return sse_response(frames, Dialect.OPENAI, handles=groups[0], on_close=lease.detach())
    every = [h for g in groups for h in g]
    work = serving.completion_response(groups, model.name, echo_texts, want_logprobs=want_logprobs)
    return JSONResponse(await until_disconnect(request, work, every))
