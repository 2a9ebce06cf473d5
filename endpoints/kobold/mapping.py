"""KoboldAI request -> prompt tokens, SamplingParams and output constraint.

Kobold semantics that differ from OpenAI's live here:
- `max_context_length` is the client's context budget: a prompt that does not
  leave room for `max_length` new tokens is cut from the left (KoboldCpp does
  the same), keeping a leading BOS token;
- `sampler_seed: -1` means random; `dynatemp_range` is a spread around
  `temperature`; `use_default_badwordsids` bans EOS; `bypass_eos` generates
  past it; `banned_tokens` are strings, not ids; `grammar` is GBNF.

Sampling follows the shared precedence (common/presets.build_params): KoboldCpp's
defaults < the active sampler preset < what the client sent < forced preset fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loguru import logger

from common.formats.constraints import ConstraintSpec, gbnf_field
from common.errors import BadRequestError, ContextLengthExceededError
from common.generation.images import ImageSource
from common.generation.prompts import Prompt, text_prompt
from common.models.manager import LoadedModel
from common.models.presets import Preset, build_params
from backends.sampling import SamplingParams
from endpoints.kobold.protocol import DEFAULT_SAMPLER_ORDER, GenerateRequest

# Generation length when neither the request nor the config sets one.
DEFAULT_MAX_LENGTH = 512

# Kobold field -> SamplingParams field, for fields whose value passes unchanged.
_FIELDS = {
    "temperature": "temperature",
    "dynatemp_exponent": "temp_exponent",
    "smoothing_factor": "smoothing_factor",
    "top_k": "top_k",
    "top_p": "top_p",
    "top_a": "top_a",
    "min_p": "min_p",
    "typical": "typical",
    "tfs": "tfs",
    "nsigma": "top_n_sigma",
    "xtc_threshold": "xtc_threshold",
    "xtc_probability": "xtc_probability",
    "rep_pen": "repetition_penalty",
    "rep_pen_range": "penalty_range",
    "presence_penalty": "presence_penalty",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "dry_penalty_last_n": "dry_range",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}

# KoboldCpp's defaults (the protocol's field defaults), for the knobs a client leaves out.
KOBOLD_DEFAULTS: dict[str, Any] = {
    canonical: GenerateRequest.model_fields[kobold].default for kobold, canonical in _FIELDS.items()
}


def default_max_length(config_default: int | None, ceiling: int | None = None) -> int:
    """Tokens generated when a request sends no max_length (never above the server's ceiling)."""
    length = config_default or DEFAULT_MAX_LENGTH
    return min(length, ceiling) if ceiling else length


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
    if body.grammar_retain_state:
        notes.append("grammar_retain_state (each generation starts the grammar afresh)")
    if notes:
        logger.info("{}: accepted but not applied: {}", route, "; ".join(notes))


def sent_fields(body: GenerateRequest, *, n_vocab: int) -> dict[str, Any]:
    """Canonical SamplingParams names for exactly the knobs the client sent."""
    given = body.model_fields_set
    sent: dict[str, Any] = {
        canonical: getattr(body, kobold) for kobold, canonical in _FIELDS.items() if kobold in given
    }
    if body.max_length is not None:
        sent["max_tokens"] = body.max_length
    if body.dynatemp_range > 0:
        sent["min_temp"] = max(0.0, body.temperature - body.dynatemp_range)
        sent["max_temp"] = body.temperature + body.dynatemp_range
    if body.sampler_seed is not None and body.sampler_seed >= 0:  # -1: random
        sent["seed"] = body.sampler_seed
    if _str_list(body.stop_sequence):
        sent["stop"] = _str_list(body.stop_sequence)
    if "use_default_badwordsids" in given:
        sent["ban_eos_token"] = body.use_default_badwordsids
    if "bypass_eos" in given:
        sent["ignore_eos"] = body.bypass_eos
    if _str_list(body.banned_tokens):
        # KoboldCpp lowercases both its phrase bans and the text it scans, like
        # banned_strings everywhere else here: no case-sensitive variant is needed.
        sent["banned_strings"] = _str_list(body.banned_tokens)
    if body.logit_bias:
        sent["logit_bias"] = _logit_bias(body.logit_bias, n_vocab)
    if "render_special" in given:
        sent["skip_special_tokens"] = not body.render_special
    if _str_list(body.dry_sequence_breakers):
        sent["dry_sequence_breakers"] = _str_list(body.dry_sequence_breakers)
    return sent


def to_sampling_params(
    body: GenerateRequest, *, n_vocab: int, default_length: int, preset: Preset | None = None
) -> SamplingParams:
    """KoboldCpp defaults < preset < the request < forced preset fields.

    max_tokens is the requested length before `fit_context` settles it.
    """
    defaults = {**KOBOLD_DEFAULTS, "max_tokens": default_length}
    return build_params(sent_fields(body, n_vocab=n_vocab), preset, defaults)


def grammar_constraint(body: GenerateRequest) -> ConstraintSpec | None:
    """`grammar` (GBNF, as KoboldCpp takes it) -> the output constraint; "" means none."""
    return gbnf_field(body.grammar)


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
    if prompt.media is not None:
        raise ContextLengthExceededError(
            f"The prompt with its images is {len(tokens)} tokens; max_context_length {budget} leaves room for "
            f"{room}. Shorten the prompt, send fewer images or lower max_length.",
            param="prompt",
        )
    keep_bos = info.add_bos_token and bool(tokens) and tokens[0] == info.bos_token_id
    head = tokens[:1] if keep_bos else []
    tail = tokens[len(tokens) - (room - len(head)):] if room > len(head) else []
    cut = head + tail
    logger.info(
        "Prompt of {} tokens cut to the last {} to leave {} for generation (max_context_length {})",
        len(tokens), len(cut), max_length, budget,
    )
    return Prompt(cut, None, prompt.stop), max_length


@dataclass(frozen=True)
class KoboldPlan:
    """A /generate request as the pipeline takes it: the prompt cut to the client's context budget,
    max_tokens the length that leaves room for."""

    prompt: Prompt
    params: SamplingParams
    constraint: ConstraintSpec | None


def image_sources(body: GenerateRequest) -> list[ImageSource]:
    """KoboldCpp's `images`: base64 strings (a data: URI is accepted too)."""
    sources = []
    for j, img in enumerate(body.images or []):
        if not isinstance(img, str):
            raise BadRequestError(f"images[{j}] must be a base64 string.", param=f"images[{j}]")
        sources.append(ImageSource(img, f"images[{j}]"))
    return sources


def generate_plan(
    body: GenerateRequest, model: LoadedModel, *, default_length: int, preset: Preset | None,
    prompt: Prompt | None = None,
) -> KoboldPlan:
    """`prompt`: the prompt already built with its images (image_prompt), else the text prompt is built here."""
    spec = grammar_constraint(body)
    params = to_sampling_params(body, n_vocab=model.info.n_vocab, default_length=default_length, preset=preset)
    if prompt is None:
        prompt = text_prompt(model, body.prompt, truncatable=True)
    prompt, length = fit_context(
        model, prompt, max_length=params.max_tokens or default_length, max_context_length=body.max_context_length
    )
    return KoboldPlan(prompt, params.with_updates(max_tokens=length), spec)
