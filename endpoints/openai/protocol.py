"""OpenAI wire models for /v1/chat/completions and /v1/completions.

Beyond OpenAI's own fields, both routes accept the TabbyAPI sampler set (with
its aliases), so SillyTavern and other front-ends can send what they send to
TabbyAPI. Unknown fields are accepted and logged by the router, never rejected.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class SamplerFields(WireModel):
    """Every sampler knob a client may send; None = not sent (preset or default applies)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    top_a: float | None = Field(None, ge=0, le=1)
    typical: float | None = Field(None, ge=0, le=1, validation_alias=_alias("typical", "typical_p"))
    tfs: float | None = Field(None, ge=0, le=1)
    top_n_sigma: float | None = Field(None, ge=0)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=1)
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_range: int | None = Field(None, ge=-1, validation_alias=_alias("dry_range", "dry_penalty_last_n"))
    dry_sequence_breakers: list[str] | str | None = None
    mirostat_mode: int | None = Field(None, ge=0, le=2, validation_alias=_alias("mirostat_mode", "mirostat"))
    mirostat_tau: float | None = Field(None, ge=0)
    mirostat_eta: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(
        None, gt=0, validation_alias=_alias("repetition_penalty", "rep_pen", "repeat_penalty")
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    penalty_range: int | None = Field(
        None, ge=-1, validation_alias=_alias("penalty_range", "rep_pen_range", "repetition_range", "repeat_last_n")
    )
    min_temp: float | None = Field(None, ge=0, validation_alias=_alias("min_temp", "dynatemp_low"))
    max_temp: float | None = Field(None, ge=0, validation_alias=_alias("max_temp", "dynatemp_high"))
    temp_exponent: float | None = Field(None, ge=0, validation_alias=_alias("temp_exponent", "dynatemp_exponent"))
    temperature_last: bool | None = None
    smoothing_factor: float | None = Field(None, ge=0)
    banned_strings: list[str] | str | None = None
    banned_tokens: list[int] | str | None = Field(
        None, validation_alias=_alias("banned_tokens", "custom_token_bans")
    )
    allowed_tokens: list[int] | str | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    ban_eos_token: bool | None = None
    ignore_eos: bool | None = None
    add_bos_token: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    json_schema: dict[str, Any] | bool | None = None
    regex_pattern: str | None = None
    grammar_string: str | None = None
    n: int = Field(1, ge=1, le=16)


class StreamOptions(BaseModel):
    include_usage: bool = False


class LoraChoice(WireModel):
    """One adapter for this request only: a name loaded with /v1/lora/load, and its strength."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200)
    scaling: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


def lora_pairs(loras: list[LoraChoice] | None) -> tuple[tuple[str, float], ...] | None:
    return None if loras is None else tuple((c.name, c.scaling) for c in loras)


class ChatCompletionRequest(SamplerFields):
    model: ModelName | None = None
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_prefix: str | None = None
    template_vars: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    loras: list[LoraChoice] | None = Field(None, max_length=16)


class CompletionRequest(SamplerFields):
    model: ModelName | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    suffix: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=16)
    loras: list[LoraChoice] | None = Field(None, max_length=16)
    user: str | None = None
    response_format: dict[str, Any] | None = None
