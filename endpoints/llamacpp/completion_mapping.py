"""llama.cpp /completion request -> prompts, SamplingParams, output constraint and answer options.

llama-server's semantics that differ from OpenAI's live here:
- `prompt` is a string, token ids, or a mix of both (one prompt, the strings
  tokenized in place, BOS only before a leading string); a list of strings or
  of such lists is several prompts, answered as a list;
- `n_predict` -1 generates until the context is full, 0 only evaluates the
  prompt (one decoding step runs, its token is not reported); `seed` -1 is random; `top_k` <= 0, `top_n_sigma` <= 0 and
  `dynatemp_range` <= 0 are off, `top_p`/`typical_p` >= 1 are off, a
  temperature <= 0 is greedy; `ignore_eos` bans the end-of-generation tokens;
- `logit_bias` is {"id" or "text": bias} or [[id or text, bias], ...], a bias
  of false bans the token; ids outside the vocabulary are skipped as
  llama-server skips them;
- `samplers` names the samplers to run, in order: the ones left out are off,
  and the temperature goes first or last as the list puts it (SamplingParams
  has no other order: a different order of the truncation samplers is
  logged as not honoured);
- `grammar` (GBNF) wins over `json_schema`, as in llama-server.

Sampling follows the shared precedence (common/presets.build_params):
llama-server's defaults < the active preset < what the client sent < forced preset fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from backends.sampling import SamplingParams
from common.errors import BadRequestError
from common.formats.constraints import ConstraintSpec, gbnf_field
from common.generation.prompts import Prompt, refuse_hopeless, text_prompt
from common.models.manager import LoadedModel
from common.models.presets import Preset, build_params
from endpoints.llamacpp.completion_protocol import LlamaCompletionRequest
from endpoints.llamacpp.mapping import LLAMACPP_DEFAULTS

# llama-server's defaults (common_params_sampling) beyond the four /infill shares.
LLAMA_SERVER_DEFAULTS: dict[str, Any] = {**LLAMACPP_DEFAULTS, "temperature_last": True, "penalty_range": 64}
MAX_PROBS = 20  # the most candidates per token the engine reports
RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama-server's "random" (LLAMA_DEFAULT_SEED)

# llama.cpp's sampler names (common_sampler_types_from_names, with its alternative names) and letters.
SAMPLER_NAMES = {
    "penalties": "penalties", "dry": "dry", "top_n_sigma": "top_n_sigma", "top-n-sigma": "top_n_sigma",
    "top_k": "top_k", "top-k": "top_k", "typ_p": "typ_p", "typ-p": "typ_p", "typical_p": "typ_p",
    "typical-p": "typ_p", "typical": "typ_p", "typ": "typ_p", "top_p": "top_p", "top-p": "top_p",
    "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p", "xtc": "xtc", "temperature": "temperature",
    "temp": "temperature", "infill": "infill", "adaptive_p": "adaptive_p",
}
SAMPLER_LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                   "m": "min_p", "x": "xtc", "t": "temperature", "i": "infill"}
TRUNCATION = ("top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc")  # the engine's fixed order
# What turns each sampler off, for samplers a `samplers` list leaves out.
SAMPLER_OFF: dict[str, dict[str, Any]] = {
    "penalties": {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "dry": {"dry_multiplier": 0.0},
    "top_n_sigma": {"top_n_sigma": 0.0},
    "top_k": {"top_k": 0},
    "typ_p": {"typical": 1.0},
    "top_p": {"top_p": 1.0},
    "min_p": {"min_p": 0.0},
    "xtc": {"xtc_probability": 0.0},
    "temperature": {"temperature": 1.0},  # without a temperature sampler llama.cpp samples the raw logits
}
# SamplingParams name -> this dialect's name, for errors SamplingParams raises.
WIRE_NAMES = {
    "repetition_penalty": "repeat_penalty", "penalty_range": "repeat_last_n", "typical": "typical_p",
    "mirostat_mode": "mirostat", "dry_range": "dry_penalty_last_n", "max_tokens": "n_predict",
    "min_temp": "dynatemp_range", "max_temp": "dynatemp_range", "temp_exponent": "dynatemp_exponent",
    "ban_eos_token": "ignore_eos", "banned_tokens": "logit_bias", "logprobs": "n_probs",
}


@dataclass(frozen=True)
class AnswerView:
    """What the answer carries beyond the generation itself, as the request asked."""

    n_probs: int = 0
    post_sampling_probs: bool = False
    return_tokens: bool = False
    id_slot: int = -1
    n_keep: int = 0
    stream: bool = False
    eval_only: bool = False  # n_predict 0: the prompt is evaluated, no token is reported
    grammar: str = ""
    response_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class LlamaPlan:
    """A /completion request as the pipeline takes it: one Prompt per prompt, `n` choices each."""

    prompts: list[Prompt]
    echoes: list[str]  # each prompt as text, for the answer's `prompt`
    params: SamplingParams
    constraint: ConstraintSpec | None
    n: int
    default_max_tokens: int | None
    view: AnswerView


# -- prompts ------------------------------------------------------------------------------------
def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _not_a_prompt(where: str, value: Any) -> BadRequestError:
    hint = ("multimodal prompts are not supported; send text or token ids" if isinstance(value, dict)
            else "send a string, token ids, or a list mixing both")
    return BadRequestError(f"'{where}' is {type(value).__name__}: {hint}.", param=where)


def _mixed_prompt(model: LoadedModel, items: list[Any], where: str) -> Prompt:
    """Token ids and strings as one prompt; BOS (as the model adds it) only before a leading string."""
    info = model.info
    refuse_hopeless(model, "".join(x for x in items if isinstance(x, str)), "prompt")
    tokens: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            add_bos = i == 0 and info.add_bos_token and not (info.bos_token and item.startswith(info.bos_token))
            tokens.extend(model.engine.tokenize(item, add_bos=add_bos, special=True))
        elif _is_id(item):
            if not 0 <= item < info.n_vocab:
                raise BadRequestError(
                    f"'{where}[{i}]' is token id {item}, outside the vocabulary (0..{info.n_vocab - 1}); "
                    "look ids up with POST /tokenize.",
                    param="prompt",
                )
            tokens.append(item)
        else:
            raise _not_a_prompt(f"{where}[{i}]", item)
    return Prompt(tokens, None)


def _one_prompt(model: LoadedModel, item: Any, where: str) -> Prompt:
    if isinstance(item, str):
        return text_prompt(model, item)
    if isinstance(item, list) and item:
        return _mixed_prompt(model, item, where)  # token ids, or ids and strings
    if isinstance(item, list):
        raise BadRequestError(f"'{where}' is an empty list; send text or token ids.", param="prompt")
    raise _not_a_prompt(where, item)


def prompts_of(body: LlamaCompletionRequest, model: LoadedModel) -> tuple[list[Prompt], list[str]]:
    """The request's prompts (llama-server's rules for which lists are one prompt) and their text."""
    raw = body.prompt
    if raw is None:
        raise BadRequestError("'prompt' is missing; send the text to complete (or token ids).", param="prompt")
    several = isinstance(raw, list) and bool(raw) and (
        any(isinstance(x, list) for x in raw) or all(isinstance(x, str) for x in raw)
    )
    if several:
        prompts = [_one_prompt(model, item, f"prompt[{i}]") for i, item in enumerate(raw)]
    else:
        prompts = [_one_prompt(model, raw, "prompt")]
    echoes = [p.text if p.text is not None else model.engine.detokenize(p.tokens, special=True) for p in prompts]
    return prompts, echoes


# -- logit bias and samplers --------------------------------------------------------------------
def _bias_value(value: Any, where: str) -> float | None:
    """A bias, or None for a ban (false). Anything else is a 400: llama-server skips it without a word."""
    if value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError(
            f"'{where}' must be a number or false (false bans the token), got {value!r}.", param="logit_bias"
        )
    return float(value)


def logit_bias_of(raw: Any, n_vocab: int, tokenize: Callable[[str], list[int]]) -> tuple[dict[int, float], set[int]]:
    """llama-server's logit_bias shapes -> (bias per token id, banned ids). Biases at or below -100 ban."""
    if raw is None:
        return {}, set()
    if isinstance(raw, dict):
        entries = [(key, value, f"logit_bias.{key}") for key, value in raw.items()]
    elif isinstance(raw, list):
        entries = []
        for i, pair in enumerate(raw):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadRequestError(
                    f"'logit_bias[{i}]' must be a pair [token id or text, bias], got {pair!r}.", param="logit_bias"
                )
            entries.append((pair[0], pair[1], f"logit_bias[{i}][1]"))
    else:
        raise BadRequestError(
            'logit_bias must be an object {"token id or text": bias} or a list of [token id or text, bias] pairs.',
            param="logit_bias",
        )
    bias: dict[int, float] = {}
    banned: set[int] = set()
    skipped: list[int] = []
    for key, value, where in entries:
        amount = _bias_value(value, where)
        if _is_id(key) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            ids = [int(key)]
        elif isinstance(key, str):
            ids = tokenize(key)
        else:
            raise BadRequestError(f"'{where[:-3]}[0]' must be a token id or text, got {key!r}.", param="logit_bias")
        for token in ids:
            if not 0 <= token < n_vocab:
                skipped.append(token)
            elif amount is None or amount <= -100.0:
                banned.add(token)
                bias.pop(token, None)
            else:
                bias[token] = min(amount, 100.0)
                banned.discard(token)
    if skipped:
        logger.info("/completion: logit_bias ids outside the vocabulary skipped (as llama-server does): {}", skipped[:8])
    return bias, banned


def samplers_of(raw: list[str] | str) -> tuple[list[str], list[str]]:
    """`samplers` as llama.cpp's canonical names in order (first occurrence), and the names not known."""
    names = [SAMPLER_LETTERS.get(c, c) for c in raw] if isinstance(raw, str) else [
        SAMPLER_NAMES.get(n.strip().lower(), n) for n in raw
    ]
    order: list[str] = []
    unknown: list[str] = []
    for name in names:
        if name in SAMPLER_OFF or name in ("infill", "adaptive_p"):
            if name not in order:
                order.append(name)
        else:
            unknown.append(name)
    return order, unknown


def apply_sampler_order(sent: dict[str, Any], order: list[str], notes: list[str]) -> None:
    """Turn off the samplers `order` leaves out; put the temperature first or last as it says."""
    for name, off in SAMPLER_OFF.items():
        if name not in order:
            sent.update(off)
    for name in ("infill", "adaptive_p"):
        if name in order:
            notes.append(f"sampler '{name}' (not available)")
    present = [n for n in order if n in TRUNCATION]
    if "temperature" in order and present:
        at = order.index("temperature")
        before = [n for n in present if order.index(n) < at]
        sent["temperature_last"] = bool(before)
        if before and len(before) < len(present):
            notes.append("temperature between truncation samplers (applied after them)")
    if present != [n for n in TRUNCATION if n in present]:
        notes.append(f"sampler order {present} (applied as {[n for n in TRUNCATION if n in present]})")
    if any(n in order for n in ("penalties", "dry")) and present:
        first = min(order.index(n) for n in present)
        if any(order.index(n) > first for n in ("penalties", "dry") if n in order):
            notes.append("penalties/dry after truncation samplers (applied before them)")


# -- the sampling parameters --------------------------------------------------------------------
def sent_fields(body: LlamaCompletionRequest, model: LoadedModel, notes: list[str]) -> dict[str, Any]:
    """Canonical SamplingParams names for exactly the knobs the client sent, in llama-server's meaning."""
    s: dict[str, Any] = {}
    if body.temperature is not None:
        s["temperature"] = max(0.0, body.temperature)
    if body.top_k is not None:
        s["top_k"] = max(0, body.top_k)
    if body.top_p is not None:
        s["top_p"] = min(1.0, body.top_p)
    if body.min_p is not None:
        s["min_p"] = body.min_p
    if body.typical_p is not None:
        s["typical"] = min(1.0, body.typical_p)
    if body.top_n_sigma is not None:
        s["top_n_sigma"] = max(0.0, body.top_n_sigma)
    for wire, canonical in (("xtc_probability", "xtc_probability"), ("xtc_threshold", "xtc_threshold"),
                            ("repeat_penalty", "repetition_penalty"), ("repeat_last_n", "penalty_range"),
                            ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                            ("dry_multiplier", "dry_multiplier"), ("dry_allowed_length", "dry_allowed_length"),
                            ("mirostat", "mirostat_mode"), ("mirostat_tau", "mirostat_tau"),
                            ("mirostat_eta", "mirostat_eta")):
        if (value := getattr(body, wire)) is not None:
            s[canonical] = value
    if body.dry_base is not None:
        s["dry_base"] = body.dry_base if body.dry_base >= 1.0 else 1.75  # llama-server's rule
    if body.dry_penalty_last_n is not None:
        if body.dry_penalty_last_n == 0:
            s["dry_multiplier"] = 0.0  # a window of no tokens: DRY is off
        else:
            s["dry_range"] = body.dry_penalty_last_n
    if body.dry_sequence_breakers is not None:
        breakers = [body.dry_sequence_breakers] if isinstance(body.dry_sequence_breakers, str) \
            else body.dry_sequence_breakers
        if not breakers:
            raise BadRequestError("'dry_sequence_breakers' must be a non-empty list of strings, "
                                  'e.g. ["\\n", ":", "\\"", "*"]; leave it out for the default.',
                                  param="dry_sequence_breakers")
        s["dry_sequence_breakers"] = tuple(breakers)
    if body.seed is not None and body.seed not in RANDOM_SEEDS:
        s["seed"] = body.seed & 0xFFFFFFFF
    if body.ignore_eos is not None:
        s["ban_eos_token"] = body.ignore_eos
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        s["stop"] = tuple(x for x in stops if x)
    if body.logit_bias is not None:
        tokenize = lambda text: model.engine.tokenize(text, add_bos=False, special=False)  # noqa: E731
        bias, banned = logit_bias_of(body.logit_bias, model.info.n_vocab, tokenize)
        s["logit_bias"] = bias
        s["banned_tokens"] = tuple(sorted(banned))
    n_probs = body.n_probs if body.n_probs is not None else body.logprobs
    if n_probs:
        if n_probs > MAX_PROBS:
            notes.append(f"n_probs {n_probs} (at most {MAX_PROBS} candidates are given)")
        s["logprobs"] = min(n_probs, MAX_PROBS)
    if body.samplers is not None and not body.mirostat:
        order, unknown = samplers_of(body.samplers)
        if unknown:
            notes.append(f"unknown samplers {unknown} (skipped, as llama-server does)")
        apply_sampler_order(s, order, notes)
    return s


def _with_dynatemp(params: SamplingParams, body: LlamaCompletionRequest) -> SamplingParams:
    """dynatemp_range r around the temperature T: T-r..T+r (not below 0), with dynatemp_exponent."""
    spread = body.dynatemp_range or 0.0
    if spread <= 0 or params.temperature <= 0:
        return params
    if body.samplers is not None and not body.mirostat and "temperature" not in samplers_of(body.samplers)[0]:
        return params  # no temperature sampler, so no dynamic temperature either
    changes: dict[str, Any] = {"min_temp": max(0.0, params.temperature - spread),
                               "max_temp": params.temperature + spread}
    if body.dynatemp_exponent is not None:
        changes["temp_exponent"] = body.dynatemp_exponent
    return params.with_updates(**changes)


def _renamed(exc: BadRequestError) -> BadRequestError:
    """A SamplingParams error under this dialect's field name."""
    wire = WIRE_NAMES.get(exc.param or "")
    if wire is None:
        return exc
    return BadRequestError(exc.message.replace(f"'{exc.param}'", f"'{wire}'"), param=wire)


def _max_tokens(body: LlamaCompletionRequest) -> int | None:
    """n_predict, else max_completion_tokens, else max_tokens (llama-server's order); None: not sent."""
    for value in (body.n_predict, body.max_completion_tokens, body.max_tokens):
        if value is not None:
            return value
    return None


def to_sampling_params(body: LlamaCompletionRequest, model: LoadedModel, preset: Preset | None) -> SamplingParams:
    notes: list[str] = []
    sent = sent_fields(body, model, notes)
    requested = _max_tokens(body)
    if requested is not None and requested > 0:
        sent["max_tokens"] = requested
    elif requested == 0:
        sent["max_tokens"] = 1  # the prompt is evaluated through one step; the token is not reported
    try:
        params = _with_dynatemp(build_params(sent, preset, LLAMA_SERVER_DEFAULTS), body)
    except BadRequestError as exc:
        raise _renamed(exc) from None
    note_unapplied(body, notes)
    return params


def note_unapplied(body: LlamaCompletionRequest, notes: list[str]) -> None:
    """Fields llama-server honours that Parley accepts without applying: say so once."""
    if body.min_keep:
        notes.append(f"min_keep={body.min_keep}")
    if body.cache_prompt is False:
        notes.append("cache_prompt=false (cached prefixes are always reused)")
    if body.id_slot is not None and body.id_slot >= 0:
        notes.append(f"id_slot={body.id_slot} (requests are placed in slots by the scheduler)")
    if body.lora:
        notes.append("lora (choose adapters with /v1/lora/load)")
    if body.mirostat and body.samplers is not None:
        notes.append("samplers (mirostat replaces them, as in llama-server)")
    if notes:
        logger.info("/completion: accepted but not applied: {}", "; ".join(notes))


def constraint_of(body: LlamaCompletionRequest) -> ConstraintSpec | None:
    """`grammar` (GBNF) when it is not empty, else `json_schema`, else none."""
    if body.grammar is not None and body.grammar.strip():
        if body.json_schema is not None:
            logger.info("/completion: json_schema ignored because a grammar was sent (as llama-server does)")
        return gbnf_field(body.grammar)
    if body.json_schema is not None:
        return ConstraintSpec.from_request(json_schema=body.json_schema)
    return None


def completion_plan(
    body: LlamaCompletionRequest, model: LoadedModel, preset: Preset | None, *, default_max_tokens: int | None
) -> LlamaPlan:
    """The whole request checked (its own mistakes first), ready for start_generation."""
    params = to_sampling_params(body, model, preset)
    constraint = constraint_of(body)
    prompts, echoes = prompts_of(body, model)
    if body.stream and len(prompts) > 1:
        raise BadRequestError(
            f"'prompt' holds {len(prompts)} prompts; a stream carries one. Send them in separate requests, "
            "or set stream to false.",
            param="prompt",
        )
    requested = _max_tokens(body)
    n_probs = body.n_probs if body.n_probs is not None else (body.logprobs or 0)
    view = AnswerView(
        n_probs=min(n_probs, MAX_PROBS),
        post_sampling_probs=bool(body.post_sampling_probs),
        return_tokens=bool(body.return_tokens),
        id_slot=body.id_slot if body.id_slot is not None else -1,
        n_keep=body.n_keep or 0,
        stream=bool(body.stream),
        eval_only=requested == 0,
        grammar=body.grammar or "",
        response_fields=tuple(body.response_fields or ()),
    )
    return LlamaPlan(
        prompts, echoes, params, constraint, n=body.n_cmpl or body.n or 1,
        default_max_tokens=default_max_tokens if requested is None else None, view=view,
    )


def default_params(preset: Preset | None) -> SamplingParams:
    """What a /completion request without sampler fields runs with (llama-server's defaults < preset)."""
    return build_params({}, preset, LLAMA_SERVER_DEFAULTS)
