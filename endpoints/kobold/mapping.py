"""KoboldAI request -> prompt tokens and SamplingParams.

Kobold semantics that differ from OpenAI's live here:
- `max_context_length` is the client's context budget: a prompt that does not
  leave room for `max_length` new tokens is cut from the left (KoboldCpp does
  the same), keeping a leading BOS token;
- `sampler_seed: -1` means random; `dynatemp_range` is a spread around
  `temperature`; `use_default_badwordsids` bans EOS; `bypass_eos` generates
  past it; `banned_tokens` are strings, not ids.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from common.errors import BadRequestError
from common.generation import Prompt
from common.models import LoadedModel
from common.sampling import SamplingParams
from endpoints.kobold.protocol import DEFAULT_SAMPLER_ORDER, GenerateRequest

# Generation length when neither the request nor the config sets one.
DEFAULT_MAX_LENGTH = 512


def default_max_length(config_default: int | None) -> int:
    return config_default or DEFAULT_MAX_LENGTH


def _str_list(value: list[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(s for s in items if s)


def _logit_bias(raw: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    if not raw:
        return {}
    out: dict[int, float] = {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError as exc:
            raise BadRequestError(
                f"'logit_bias' keys must be token ids (got {key!r}); find ids with POST /api/extra/tokenize.",
                param="logit_bias",
            ) from exc
        if not 0 <= token < n_vocab:
            raise BadRequestError(
                f"'logit_bias' token id {token} is outside the vocabulary (0..{n_vocab - 1}).", param="logit_bias"
            )
        out[token] = float(bias)
    return out


def note_unapplied(body: GenerateRequest, route: str) -> None:
    """Fields KoboldCpp honours that this server accepts without applying: say so once."""
    notes: list[str] = []
    if body.rep_pen_slope != 1.0:
        notes.append(f"rep_pen_slope={body.rep_pen_slope}")
    if body.sampler_order and tuple(body.sampler_order) != DEFAULT_SAMPLER_ORDER:
        notes.append("sampler_order (llama.cpp applies its own order)")
    if body.grammar and body.grammar.strip():
        notes.append("grammar (constrained generation is not supported yet)")
    if body.grammar_retain_state:
        notes.append("grammar_retain_state")
    if body.images:
        notes.append(f"{len(body.images)} image(s) (the model cannot read images)")
    if notes:
        logger.info("{}: accepted but not applied: {}", route, "; ".join(notes))


def to_sampling_params(body: GenerateRequest, *, max_tokens: int, n_vocab: int) -> SamplingParams:
    values: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "temp_exponent": body.dynatemp_exponent,
        "smoothing_factor": body.smoothing_factor,
        "top_k": body.top_k,
        "top_p": body.top_p,
        "top_a": body.top_a,
        "min_p": body.min_p,
        "typical": body.typical,
        "tfs": body.tfs,
        "top_n_sigma": body.nsigma,
        "xtc_threshold": body.xtc_threshold,
        "xtc_probability": body.xtc_probability,
        "repetition_penalty": body.rep_pen,
        "penalty_range": body.rep_pen_range,
        "presence_penalty": body.presence_penalty,
        "dry_multiplier": body.dry_multiplier,
        "dry_base": body.dry_base,
        "dry_allowed_length": body.dry_allowed_length,
        "dry_range": body.dry_penalty_last_n,
        "mirostat_mode": body.mirostat,
        "mirostat_tau": body.mirostat_tau,
        "mirostat_eta": body.mirostat_eta,
        "seed": None if body.sampler_seed is None or body.sampler_seed < 0 else body.sampler_seed,
        "stop": _str_list(body.stop_sequence),
        "ban_eos_token": body.use_default_badwordsids,
        "ignore_eos": body.bypass_eos,
        "banned_strings": _str_list(body.banned_tokens),
        "logit_bias": _logit_bias(body.logit_bias, n_vocab),
        "skip_special_tokens": not body.render_special,
    }
    if body.dynatemp_range > 0:
        values["min_temp"] = max(0.0, body.temperature - body.dynatemp_range)
        values["max_temp"] = body.temperature + body.dynatemp_range
    breakers = _str_list(body.dry_sequence_breakers)
    if breakers:
        values["dry_sequence_breakers"] = breakers
    return SamplingParams(**values)


def fit_context(
    model: LoadedModel, prompt: Prompt, *, max_length: int, max_context_length: int | None
) -> tuple[Prompt, int]:
    """Cut the prompt from the left so prompt + max_length fits the client's context budget.

    The budget is the client's max_context_length capped by the model's context.
    Like KoboldCpp, a max_length that leaves no room for the prompt is lowered
    to budget - 1. Returns the prompt to use and the generation length.
    """
    info = model.info
    budget = min(max_context_length or info.n_ctx, info.n_ctx)
    if budget < 2:
        raise BadRequestError(
            f"max_context_length {budget} leaves no room for a prompt and an answer; send at least 2.",
            param="max_context_length",
        )
    if max_length >= budget:
        logger.warning(
            "max_length {} does not fit max_context_length {}; generating {} tokens instead",
            max_length, budget, budget - 1,
        )
        max_length = budget - 1
    room = budget - max_length
    tokens = prompt.tokens
    if len(tokens) <= room:
        return prompt, max_length
    keep_bos = info.add_bos_token and bool(tokens) and tokens[0] == info.bos_token_id
    head = tokens[:1] if keep_bos else []
    tail = tokens[len(tokens) - (room - len(head)):] if room > len(head) else []
    cut = head + tail
    logger.info(
        "Prompt of {} tokens cut to the last {} to leave {} for generation (max_context_length {})",
        len(tokens), len(cut), max_length, budget,
    )
    return Prompt(cut, None, prompt.stop), max_length
