"""llama.cpp server response framing: /infill answers and SSE frames, /tokenize pieces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from backends.base import Finished, TextDelta
from common.generation.pipeline import Generation
from common.models.manager import LoadedModel
from endpoints.http.streaming import dumps
from endpoints.llamacpp.completion_serving import stop_type, timings
from endpoints.llamacpp.protocol import TokenizeRequest


def final_body(model: LoadedModel, generation: Generation, finish: Finished, content: str,
               tokens: list[int]) -> dict[str, Any]:
    """llama.cpp's last answer object (the whole answer when not streaming)."""
    params = generation.params
    return {
        "index": 0,
        "content": content,
        "tokens": tokens,
        "id_slot": 0,
        "stop": True,
        "model": model.name,
        "tokens_predicted": finish.usage.completion_tokens,
        "tokens_evaluated": finish.usage.prompt_tokens or len(generation.prompt_tokens),
        "tokens_cached": finish.usage.cached_tokens,
        "truncated": False,
        "stop_type": stop_type(finish),
        "stopping_word": finish.stop_string or "",
        "generation_settings": {
            "n_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "seed": params.seed if params.seed is not None else -1,
            "stop": list(params.stop),
        },
        "timings": timings(finish.usage),
    }


async def infill_response(model: LoadedModel, generation: Generation) -> dict[str, Any]:
    (result,) = await generation.collect()
    assert result.finish is not None  # collect raises for a choice without one
    return final_body(model, generation, result.finish, result.text, result.token_ids)


async def infill_stream(model: LoadedModel, generation: Generation) -> AsyncIterator[str]:
    predicted = 0
    n_prompt = len(generation.prompt_tokens)
    async with aclosing(generation.events()) as events:
        async for _, ev in events:
            if isinstance(ev, TextDelta):
                predicted += len(ev.token_ids)
                if ev.text:
                    frame = {"index": 0, "content": ev.text, "tokens": list(ev.token_ids), "stop": False,
                             "id_slot": -1, "tokens_predicted": predicted, "tokens_evaluated": n_prompt}
                    yield f"data: {dumps(frame)}\n\n"
                continue
            failure = generation.failure(ev)
            if failure is not None:
                raise failure
            yield f"data: {dumps(final_body(model, generation, ev, '', []))}\n\n"


def tokenize_body(body: TokenizeRequest, model: LoadedModel) -> dict[str, Any]:
    add_bos = body.add_special and model.info.add_bos_token
    tokens = model.engine.tokenize(body.content, add_bos=add_bos, special=body.parse_special)
    if not body.with_pieces:
        return {"tokens": tokens}
    out: list[dict[str, Any]] = []
    for t in tokens:
        raw = model.engine.token_piece(t)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return {"tokens": out}
