"""llama.cpp server answers: /completion's result objects and SSE frames, and the /slots list.

Shapes follow llama-server (tools/server): a result is `{index, content,
tokens, id_slot, stop: true, model, tokens_predicted, tokens_evaluated,
generation_settings, prompt, has_new_line, truncated, stop_type,
stopping_word, tokens_cached, timings}` plus `completion_probabilities` when
n_probs > 0; a stream sends `{index, content, tokens, stop: false, id_slot,
tokens_predicted, tokens_evaluated}` frames (with that piece's
`completion_probabilities`), then the result with `content: ""`, and no
`[DONE]`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from backends.base import Finished, FinishReason, TextDelta, TokenLogprob, Usage
from backends.sampling import SamplingParams
from common.generation.pipeline import Generation
from common.models.manager import LoadedModel
from endpoints.http.streaming import dumps
from endpoints.llamacpp.completion_mapping import AnswerView, LlamaPlan

LOWEST_LOGPROB = -3.4028234663852886e38  # what llama-server sends for a probability of 0
RANDOM_SEED = 0xFFFFFFFF  # how llama-server reports "random"


def stop_type(finish: Finished) -> str:
    if finish.reason is FinishReason.LENGTH:
        return "limit"
    if finish.reason is FinishReason.STOP:
        return "word" if finish.stop_string else "eos"
    return "none"


def timings(u: Usage, *, eval_only: bool = False) -> dict[str, Any]:
    prompt_n = max(0, u.prompt_tokens - u.cached_tokens)
    prompt_ms = u.prompt_seconds * 1000
    predicted_n = 0 if eval_only else u.completion_tokens
    predicted_ms = 0.0 if eval_only else u.generation_seconds * 1000
    out = {
        "cache_n": u.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / u.prompt_seconds if u.prompt_seconds else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / (predicted_ms / 1000) if predicted_ms else 0.0,
    }
    if u.draft_tokens:
        out["draft_n"] = u.draft_tokens
        out["draft_n_accepted"] = u.accepted_draft_tokens
    return out


def samplers_run(params: SamplingParams) -> list[str]:
    """The samplers the engine runs for `params`, by llama.cpp's names, in the engine's order."""
    out = []
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        out.append("penalties")
    if params.dry_multiplier > 0:
        out.append("dry")
    truncation = [name for name, on in (
        ("top_n_sigma", params.top_n_sigma > 0), ("top_k", params.top_k > 0), ("typ_p", params.typical < 1.0),
        ("top_p", params.top_p < 1.0), ("min_p", params.min_p > 0), ("xtc", params.xtc_probability > 0),
    ) if on]
    if params.mirostat_mode:
        return [*out, "temperature"]
    return [*out, *truncation, "temperature"] if params.temperature_last else [*out, "temperature", *truncation]


def generation_settings(model: LoadedModel, params: SamplingParams, view: AnswerView) -> dict[str, Any]:
    """The effective settings, under llama-server's names (its `generation_settings`)."""
    n_ctx = model.info.n_ctx
    if view.eval_only:
        n_predict = 0
    else:
        n_predict = params.max_tokens if params.max_tokens is not None else -1
    bias: list[dict[str, Any]] = [{"bias": b, "token": t} for t, b in params.logit_bias.items()]
    bias += [{"bias": None, "token": t} for t in params.banned_tokens]  # -inf, which JSON cannot carry
    return {
        "n_ctx": n_ctx,
        "model": model.name,
        "seed": params.seed if params.seed is not None else RANDOM_SEED,
        "temperature": params.temperature,
        "dynatemp_range": (params.max_temp - params.min_temp) / 2 if params.dynamic_temperature else 0.0,
        "dynatemp_exponent": params.temp_exponent,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "top_n_sigma": params.top_n_sigma if params.top_n_sigma > 0 else -1.0,
        "xtc_probability": params.xtc_probability,
        "xtc_threshold": params.xtc_threshold,
        "typical_p": params.typical,
        "repeat_last_n": n_ctx if params.penalty_range < 0 else params.penalty_range,
        "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "dry_multiplier": params.dry_multiplier,
        "dry_base": params.dry_base,
        "dry_allowed_length": params.dry_allowed_length,
        "dry_penalty_last_n": n_ctx if params.dry_range <= 0 else params.dry_range,
        "dry_sequence_breakers": list(params.dry_sequence_breakers),
        "mirostat": params.mirostat_mode,
        "mirostat_tau": params.mirostat_tau,
        "mirostat_eta": params.mirostat_eta,
        "stop": list(params.stop),
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": view.n_keep,
        "n_discard": 0,
        "ignore_eos": params.ban_eos_token,
        "stream": view.stream,
        "logit_bias": bias,
        "n_probs": view.n_probs,
        "min_keep": 0,
        "grammar": view.grammar,
        "samplers": samplers_run(params),
        "timings_per_token": False,
        "post_sampling_probs": view.post_sampling_probs,
        "lora": [],
    }


def _candidate(token_id: int, text: str, raw: Sequence[int], logprob: float, post: bool) -> dict[str, Any]:
    if post:
        return {"id": token_id, "token": text, "bytes": list(raw), "prob": math.exp(logprob)}
    return {"id": token_id, "token": text, "bytes": list(raw),
            "logprob": logprob if math.isfinite(logprob) else LOWEST_LOGPROB}


def probabilities(model: LoadedModel, logprobs: Sequence[TokenLogprob], view: AnswerView) -> list[dict[str, Any]]:
    """llama-server's `completion_probabilities`: per token {id, token, bytes, logprob, top_logprobs}
    (with post_sampling_probs: prob and top_probs, from the model's distribution before sampling)."""
    post = view.post_sampling_probs
    out = []
    for lp in logprobs:
        entry = _candidate(lp.token_id, lp.token, lp.bytes, lp.logprob, post)
        entry["top_probs" if post else "top_logprobs"] = [
            _candidate(tid, text, model.engine.token_piece(tid), logprob, post) for text, tid, logprob in lp.top
        ]
        out.append(entry)
    return out


def nested_values(paths: Sequence[str], body: dict[str, Any]) -> dict[str, Any]:
    """llama-server's `response_fields`: only these fields, a/b naming b inside a, each under its path."""
    out: dict[str, Any] = {}
    for path in paths:
        current: Any = body
        for key in path.split("/"):
            if not isinstance(current, dict) or key not in current:
                break
            current = current[key]
        else:
            out[path] = current
    return out


def final_body(
    model: LoadedModel, params: SamplingParams, finish: Finished, view: AnswerView, *, index: int, content: str,
    token_ids: Sequence[int], has_new_line: bool, echo: str, n_prompt: int,
    probs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One completion's result object (the last frame of a stream, with content "")."""
    u = finish.usage
    eval_only = view.eval_only
    body: dict[str, Any] = {
        "index": index,
        "content": "" if eval_only else content,
        "tokens": list(token_ids) if view.return_tokens and not eval_only else [],
        "id_slot": view.id_slot,
        "stop": True,
        "model": model.name,
        "tokens_predicted": 0 if eval_only else u.completion_tokens,
        "tokens_evaluated": u.prompt_tokens or n_prompt,
        "generation_settings": generation_settings(model, params, view),
        "prompt": echo,
        "has_new_line": has_new_line and not eval_only,
        "truncated": False,
        "stop_type": "limit" if eval_only else stop_type(finish),
        "stopping_word": "" if eval_only else (finish.stop_string or ""),
        "tokens_cached": u.cached_tokens,
        "timings": timings(u, eval_only=eval_only),
    }
    if probs is not None and view.n_probs > 0 and not eval_only:
        body["completion_probabilities"] = probs
    return nested_values(view.response_fields, body) if view.response_fields else body


async def completion_response(
    model: LoadedModel, generations: Sequence[Generation], plan: LlamaPlan
) -> dict[str, Any] | list[dict[str, Any]]:
    """Every prompt's choices as result objects: one object, or a list when there are several."""
    view = plan.view
    results = []
    for g, generation in enumerate(generations):
        n_prompt = len(generation.prompt_tokens)
        for choice in await generation.collect(keep_logprobs=view.n_probs > 0):
            assert choice.finish is not None  # collect raises for a choice without one
            probs = probabilities(model, choice.logprobs, view) if view.n_probs > 0 else None
            results.append(final_body(
                model, generation.handles[choice.index].request.params, choice.finish, view,
                index=g * plan.n + choice.index, content=choice.text, token_ids=choice.token_ids,
                has_new_line="\n" in choice.text, echo=plan.echoes[g], n_prompt=n_prompt, probs=probs,
            ))
    return results[0] if len(results) == 1 else results


async def completion_stream(model: LoadedModel, generation: Generation, plan: LlamaPlan) -> AsyncIterator[str]:
    """SSE frames of one prompt's choices (interleaved, told apart by `index`), then each one's result."""
    view = plan.view
    n_prompt = len(generation.prompt_tokens)
    predicted: dict[int, int] = defaultdict(int)
    new_line: dict[int, bool] = defaultdict(bool)
    held_ids: dict[int, list[int]] = defaultdict(list)
    held_probs: dict[int, list[TokenLogprob]] = defaultdict(list)
    async with aclosing(generation.events()) as events:
        async for i, ev in events:
            if isinstance(ev, TextDelta):
                if view.eval_only:
                    continue
                predicted[i] += len(ev.token_ids)
                held_ids[i].extend(ev.token_ids)
                held_probs[i].extend(ev.logprobs)
                if not ev.text:
                    continue  # tokens held back (a possible stop string, part of a character)
                new_line[i] = new_line[i] or "\n" in ev.text
                frame: dict[str, Any] = {
                    "index": i, "content": ev.text, "tokens": held_ids[i] if view.return_tokens else [],
                    "stop": False, "id_slot": view.id_slot, "tokens_predicted": predicted[i],
                    "tokens_evaluated": n_prompt,
                }
                if view.n_probs > 0 and held_probs[i]:
                    frame["completion_probabilities"] = probabilities(model, held_probs[i], view)
                yield f"data: {dumps(frame)}\n\n"
                held_ids[i], held_probs[i] = [], []
                continue
            failure = generation.failure(ev)
            if failure is not None:
                raise failure
            final = final_body(
                model, generation.handles[i].request.params, ev, view, index=i, content="", token_ids=(),
                has_new_line=new_line[i], echo=plan.echoes[0], n_prompt=n_prompt,
            )
            yield f"data: {dumps(final)}\n\n"


def slots_body(model: LoadedModel, params: SamplingParams) -> list[dict[str, Any]]:
    """llama-server's /slots from the engine's counters: which slots exist and how many are busy.

    The engine reports counts, not per-slot state, so the first `slots_active`
    ids are shown processing, and each slot shows the settings a request
    without sampler fields gets; no prompt text is ever shown.
    """
    stats = model.engine.stats()
    settings = generation_settings(model, params, AnswerView())
    speculative = str(model.info.load_options.get("draft_mode") or "none") != "none"
    slots = []
    for i in range(stats.slots_total):
        busy = i < stats.slots_active
        slots.append({
            "id": i,
            "id_task": -1,
            "n_ctx": model.info.n_ctx,
            "speculative": speculative,
            "is_processing": busy,
            "params": settings,
            "next_token": [{"has_next_token": busy, "has_new_line": False, "n_remain": -1, "n_decoded": 0,
                            "stopping_word": ""}],
        })
    return slots
