"""OpenAI (+ TabbyAPI sampler) request -> SamplingParams and output constraint."""

from __future__ import annotations

from typing import Any

from common.formats.constraints import ConstraintSpec
from common.errors import BadRequestError
from common.models.presets import Preset, build_params
from backends.sampling import SamplingParams
from common.formats.tools import ToolFormat, tool_call_grammar
from endpoints.openai.protocol import ChatCompletionRequest, SamplerFields

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
