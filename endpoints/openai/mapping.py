"""OpenAI (+ TabbyAPI sampler) request -> prompt, SamplingParams, output constraint and output options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from backends.base import ImageInput
from backends.sampling import SamplingParams
from common.config.schema import ModelConfig
from common.errors import BadRequestError
from common.formats.constraints import ConstraintSpec
from common.formats.output import OutputOptions
from common.formats.tools import ToolFormat, tool_call_grammar
from common.generation.fim import fim_prompt, has_fim
from common.generation.prompts import Prompt, chat_prompt, text_prompt
from common.models.manager import LoadedModel
from common.models.presets import Preset, build_params
from endpoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplerFields

# Field names whose value passes to SamplingParams unchanged.
_DIRECT = (
    "temperature", "top_p", "top_k", "min_p", "top_a", "typical", "tfs", "top_n_sigma",
    "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_range", "mirostat_mode", "mirostat_tau", "mirostat_eta", "repetition_penalty",
    "frequency_penalty", "presence_penalty", "penalty_range", "min_temp", "max_temp",
    "temp_exponent", "temperature_last", "smoothing_factor", "min_tokens", "ban_eos_token",
    "ignore_eos", "add_bos_token", "skip_special_tokens", "seed",
)


def _int_list(value: list[int] | str, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError as exc:
            raise BadRequestError(f"'{name}' must be a list of token ids or a comma-separated string.", param=name) from exc
    return tuple(value)


def _str_list(value: list[str] | str) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def sent_fields(req: SamplerFields) -> dict[str, Any]:
    """Canonical SamplingParams names for exactly the knobs the client sent."""
    sent: dict[str, Any] = {name: getattr(req, name) for name in _DIRECT if getattr(req, name) is not None}
    if req.logit_bias:
        try:
            sent["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError as exc:
            raise BadRequestError("'logit_bias' keys must be token ids.", param="logit_bias") from exc
    if req.banned_tokens is not None:
        sent["banned_tokens"] = _int_list(req.banned_tokens, "banned_tokens")
    if req.allowed_tokens is not None:
        sent["allowed_tokens"] = _int_list(req.allowed_tokens, "allowed_tokens")
    if req.banned_strings is not None:
        sent["banned_strings"] = _str_list(req.banned_strings)
    if req.dry_sequence_breakers is not None:
        sent["dry_sequence_breakers"] = _str_list(req.dry_sequence_breakers)
    if req.stop is not None:
        sent["stop"] = tuple(s for s in _str_list(req.stop) if s)
    if req.stop_token_ids is not None:
        sent["stop_token_ids"] = tuple(req.stop_token_ids)
    return sent


def to_sampling_params(
    req: SamplerFields, *, max_tokens: int | None, logprobs: int | None, preset: Preset | None = None
) -> SamplingParams:
    sent = sent_fields(req)
    if max_tokens is not None:
        sent["max_tokens"] = max_tokens
    if logprobs is not None:
        sent["logprobs"] = logprobs
    return build_params(sent, preset)


def constraint_spec(req: SamplerFields, response_format: dict[str, Any] | None) -> ConstraintSpec | None:
    return ConstraintSpec.from_request(
        json_schema=req.json_schema,
        regex_pattern=req.regex_pattern,
        grammar_string=req.grammar_string,
        response_format=response_format,
    )


def chat_constraint(req: ChatCompletionRequest, tool_format: ToolFormat | None) -> ConstraintSpec | None:
    """The output constraint of a chat request: forced tool calls, or the structured-output fields."""
    spec = constraint_spec(req, req.response_format)
    if req.tools and tool_format is not None:
        forced = tool_call_grammar(req.tools, req.tool_choice, req.parallel_tool_calls is not False, tool_format)
        if forced is not None:
            if spec is not None:
                raise BadRequestError(
                    "tool_choice forces a tool call, which cannot be combined with response_format, "
                    "json_schema, regex_pattern or grammar_string. Drop one of them.",
                    param="tool_choice",
                )
            return forced
    elif req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise BadRequestError("tool_choice needs 'tools'.", param="tool_choice")
    return spec


@dataclass(frozen=True)
class ChatPlan:
    """A chat request as the pipeline takes it, and how its output is split and framed."""

    prompt: Prompt
    params: SamplingParams
    constraint: ConstraintSpec | None
    options: OutputOptions
    want_logprobs: bool


def chat_plan(
    body: ChatCompletionRequest, model: LoadedModel, mc: ModelConfig, preset: Preset | None,
    *, messages: list[dict[str, Any]] | None = None, images: Sequence[ImageInput] = (),
) -> ChatPlan:
    """`messages` and `images`: the request's messages with their images resolved (resolve_message_images)."""
    template_vars = {**(body.chat_template_kwargs or {}), **(body.template_vars or {})}
    if body.reasoning_effort:
        template_vars.setdefault("reasoning_effort", body.reasoning_effort)
    prompt = chat_prompt(
        model,
        body.messages if messages is None else messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools if body.tool_choice != "none" else None,
        template_vars=template_vars or None,
        response_prefix=body.response_prefix,
        images=images,
    )
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
    if prompt.chat is not None:
        # The upstream server parses its model's tool calls and enforces tool_choice itself.
        prompt.chat = replace(prompt.chat, tool_choice=body.tool_choice if body.tools else None)
        spec = chat_constraint(body, None)
    else:
        spec = chat_constraint(body, options.tool_format)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = to_sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, preset=preset)
    if options.tool_format is not None:
        params = params.with_updates(skip_special_tokens=False)  # some formats mark calls with special tokens
    return ChatPlan(prompt, params, spec, options, want_logprobs=logprobs is not None)


@dataclass(frozen=True)
class CompletionPlan:
    """A text completion request: one prompt per requested prompt, sharing params and constraint."""

    prompts: list[Prompt]
    params: SamplingParams
    constraint: ConstraintSpec | None
    echo_texts: list[str]  # per prompt, when echo is on; else empty


def _raw_prompts(body: CompletionRequest) -> list[str | list[int]]:
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
    return prompts


def completion_plan(body: CompletionRequest, model: LoadedModel, preset: Preset | None) -> CompletionPlan:
    raw = _raw_prompts(body)
    # An empty suffix on a model without FIM is a plain completion (some clients always send one).
    fim = body.suffix is not None and (body.suffix != "" or has_fim(model))
    if fim and not (len(raw) == 1 and isinstance(raw[0], str)):
        raise BadRequestError(
            "'suffix' (fill-in-the-middle) takes one text prompt, the code before the cursor; "
            "send one string as 'prompt', or the prompts in separate requests.",
            param="prompt",
        )
    params = to_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs, preset=preset)
    spec = constraint_spec(body, body.response_format)
    prompts = [
        fim_prompt(model, p, body.suffix or "", add_bos=body.add_bos_token)
        if fim and isinstance(p, str) else text_prompt(model, p, add_bos=body.add_bos_token)
        for p in raw
    ]
    echo = [p.text if p.text is not None else model.engine.detokenize(p.tokens) for p in prompts] if body.echo else []
    return CompletionPlan(prompts, params, spec, echo)
