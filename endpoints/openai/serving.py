"""OpenAI response framing for chat and text completions."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from backends.base import Finished, FinishReason, GenerationHandle, TextDelta, Usage
from common.errors import APIError, EngineError, ModelNotLoadedError
from common.generation import collect, merge_events, raise_if_failed, total_usage
from common.streaming import dumps

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def stream_failure(finish: Finished) -> APIError | None:
    if finish.reason is FinishReason.ERROR:
        return EngineError(finish.error or "The engine failed while generating. Retry the request.")
    if finish.reason is FinishReason.UNLOAD:
        return ModelNotLoadedError("The model was unloaded while generating. Load it again and retry.")
    return None


# -- chat --------------------------------------------------------------------
async def chat_response(handles: list[GenerationHandle], model_name: str) -> dict[str, Any]:
    results = await collect(handles)
    for r in results:
        raise_if_failed(r.finish)
    finishes = [r.finish for r in results if r.finish is not None]
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(r.finish.reason, "stop") if r.finish else "stop",
            }
            for r in results
        ],
        "usage": usage_body(total_usage(finishes)),
    }


async def chat_stream(
    handles: list[GenerationHandle], model_name: str, *, include_usage: bool
) -> AsyncIterator[str]:
    cid = new_id("chatcmpl")
    created = int(time.time())
    head = f'{{"id":"{cid}","object":"chat.completion.chunk","created":{created},"model":{dumps(model_name)},'
    usage_null = ',"usage":null' if include_usage else ""

    def frame(index: int, delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f'data: {head}"choices":[{dumps(choice)}]{usage_null}}}\n\n'

    for i in range(len(handles)):
        yield frame(i, {"role": "assistant", "content": ""}, None)
    finishes: list[Finished] = []
    async with aclosing(merge_events(handles)) as events:
        async for i, ev in events:
            if isinstance(ev, TextDelta):
                if ev.text:
                    yield frame(i, {"content": ev.text}, None)
                continue
            failure = stream_failure(ev)
            if failure is not None:
                raise failure
            finishes.append(ev)
            yield frame(i, {}, FINISH_REASONS.get(ev.reason, "stop"))
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [], "usage": usage_body(total_usage(finishes))}
        yield f"data: {dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# -- text completions ----------------------------------------------------------
async def completion_response(
    groups: list[list[GenerationHandle]], model_name: str, echo_texts: list[str]
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    finishes: list[Finished] = []
    usage = Usage()
    for p, handles in enumerate(groups):
        results = await collect(handles)
        group_finishes = []
        for r in results:
            raise_if_failed(r.finish)
            assert r.finish is not None
            group_finishes.append(r.finish)
            choices.append({
                "index": p * len(handles) + r.index,
                "text": (echo_texts[p] if echo_texts else "") + r.text,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(r.finish.reason, "stop"),
            })
        g = total_usage(group_finishes)
        usage.prompt_tokens += g.prompt_tokens
        usage.completion_tokens += g.completion_tokens
        usage.cached_tokens += g.cached_tokens
        finishes.extend(group_finishes)
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage_body(usage),
    }


async def completion_stream(
    handles: list[GenerationHandle], model_name: str, *, include_usage: bool, echo_text: str = ""
) -> AsyncIterator[str]:
    cid = new_id("cmpl")
    created = int(time.time())
    head = f'{{"id":"{cid}","object":"text_completion","created":{created},"model":{dumps(model_name)},'
    usage_null = ',"usage":null' if include_usage else ""

    def frame(index: int, text: str, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return f'data: {head}"choices":[{dumps(choice)}]{usage_null}}}\n\n'

    if echo_text:
        for i in range(len(handles)):
            yield frame(i, echo_text, None)
    finishes: list[Finished] = []
    async with aclosing(merge_events(handles)) as events:
        async for i, ev in events:
            if isinstance(ev, TextDelta):
                if ev.text:
                    yield frame(i, ev.text, None)
                continue
            failure = stream_failure(ev)
            if failure is not None:
                raise failure
            finishes.append(ev)
            yield frame(i, "", FINISH_REASONS.get(ev.reason, "stop"))
    if include_usage:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [], "usage": usage_body(total_usage(finishes))}
        yield f"data: {dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
