"""OpenAI (+ TabbyAPI sampler) request -> SamplingParams."""

from __future__ import annotations

from typing import Any

from common.errors import BadRequestError
from common.sampling import SamplingParams
from endpoints.openai.protocol import SamplerFields

# Field names whose value passes to SamplingParams unchanged.
_DIRECT = (
    "temperature", "top_p", "top_k", "min_p", "top_a", "typical", "tfs", "top_n_sigma",
    "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_range", "mirostat_mode", "mirostat_tau", "mirostat_eta", "repetition_penalty",
    "frequency_penalty", "presence_penalty", "penalty_range", "min_temp", "max_temp",
    "temp_exponent", "temperature_last", "smoothing_factor", "min_tokens", "ban_eos_token",
    "ignore_eos", "add_bos_token", "skip_special_tokens", "seed",
)


def _int_list(value: list[int] | str | None, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError as exc:
            raise BadRequestError(f"'{name}' must be a list of token ids or a comma-separated string.", param=name) from exc
    return tuple(value)


def _str_list(value: list[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def to_sampling_params(req: SamplerFields, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    values: dict[str, Any] = {name: getattr(req, name) for name in _DIRECT if getattr(req, name) is not None}
    if req.logit_bias:
        try:
            values["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError as exc:
            raise BadRequestError("'logit_bias' keys must be token ids.", param="logit_bias") from exc
    values["banned_tokens"] = _int_list(req.banned_tokens, "banned_tokens")
    values["allowed_tokens"] = _int_list(req.allowed_tokens, "allowed_tokens")
    values["banned_strings"] = _str_list(req.banned_strings)
    if req.dry_sequence_breakers is not None:
        values["dry_sequence_breakers"] = _str_list(req.dry_sequence_breakers)
    values["stop"] = tuple(s for s in _str_list(req.stop) if s)
    values["stop_token_ids"] = tuple(req.stop_token_ids or ())
    values["max_tokens"] = max_tokens
    values["logprobs"] = logprobs
    return SamplingParams(**values)
