"""llama.cpp server's POST /completion body, with llama-server's field names.

Every field is optional and None means "not sent" (llama-server's default or
the active preset applies; a JSON null counts as not sent, as llama-server
reads it). Types are checked, so a wrongly typed field is a 400 naming it;
value ranges are llama-server's (it accepts e.g. a negative temperature as
greedy, top_k <= 0 as off), so completion_mapping.py maps them onto SamplingParams'
bounds. `prompt` and `logit_bias` take several shapes and are checked in
completion_mapping.py. Unknown fields are accepted, as llama-server does.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel


class LlamaCompletionRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    prompt: Any = Field(
        None, description="A string, token ids, a mix of both (one prompt), or a list of those (several prompts)."
    )
    model: ModelName | None = None
    stream: bool | None = None

    # Length
    n_predict: int | None = Field(None, ge=-1, description="-1: until the context is full; 0: evaluate the prompt only.")
    max_tokens: int | None = Field(None, ge=-1, description="Used when n_predict is not sent.")
    max_completion_tokens: int | None = Field(None, ge=-1, description="Used when n_predict is not sent.")
    n: int | None = Field(None, ge=1, le=16, description="Completions of each prompt (answered as a list).")
    n_cmpl: int | None = Field(None, ge=1, le=16, description="Same as n.")

    # Temperature and truncation (llama-server's ranges: <= 0 turns top_k, top_n_sigma, dynatemp off)
    temperature: float | None = Field(None, le=100, description="<= 0: greedy.")
    dynatemp_range: float | None = Field(None, le=100)
    dynatemp_exponent: float | None = Field(None, ge=0, le=100)
    top_k: int | None = None
    top_p: float | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0)
    top_n_sigma: float | None = Field(None, le=100)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    min_keep: int | None = Field(None, ge=0)
    samplers: list[str] | str | None = Field(
        None, description="Sampler order by name (or llama.cpp's letters); samplers left out are off."
    )

    # Repetition
    repeat_penalty: float | None = Field(None, ge=0, le=100)
    repeat_last_n: int | None = Field(None, ge=-1, description="-1: the whole context; 0: off.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    dry_multiplier: float | None = Field(None, ge=0, le=100)
    dry_base: float | None = Field(None, le=100, description="Below 1: llama-server's default 1.75.")
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_penalty_last_n: int | None = Field(None, ge=-1, description="-1: the whole context; 0: DRY off.")
    dry_sequence_breakers: list[str] | str | None = None

    # Mirostat
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0, le=100)
    mirostat_eta: float | None = Field(None, ge=0, le=1)

    # Tokens, seed, stopping
    seed: int | None = Field(None, description="-1: random.")
    ignore_eos: bool | None = None
    logit_bias: Any = Field(
        None, description='{"id" or "text": bias} or [[id or text, bias], ...]; a bias of false bans the token.'
    )
    stop: list[str] | str | None = None

    # Output constraints
    grammar: str | None = Field(None, description="GBNF; empty: none.")
    json_schema: dict[str, Any] | None = Field(None, description="Used when no grammar is sent.")

    # What the answer carries
    n_probs: int | None = Field(None, ge=0, description="Top candidates per generated token (at most 20 are given).")
    logprobs: int | None = Field(None, ge=0, description="Same as n_probs when n_probs is not sent.")
    post_sampling_probs: bool | None = None
    return_tokens: bool | None = None
    response_fields: list[str] | None = None

    # Accepted for compatibility (Parley schedules slots and reuses cached prefixes itself)
    cache_prompt: bool | None = None
    id_slot: int | None = None
    n_keep: int | None = Field(None, ge=-1)
    n_discard: int | None = None
    n_indent: int | None = None
    n_cache_reuse: int | None = None
    t_max_predict_ms: int | None = None
    t_max_prompt_ms: int | None = None
    timings_per_token: bool | None = None
    return_progress: bool | None = None
    lora: list[Any] | None = None
