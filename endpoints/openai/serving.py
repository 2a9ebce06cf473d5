"""OpenAI response framing for chat and text completions.

Chat output cut by max_tokens ends with finish_reason "length", inside a tool
call too; the cut call keeps its partial arguments, streamed or not.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from backends.base import Finished, FinishReason, TextDelta, TokenLogprob, Usage
from common.formats.output import ChatDeltas, ChatOutput, OutputOptions, parse_whole
from common.generation.pipeline import Generation, total_usage
from endpoints.http.streaming import dumps
from common.formats.tools import ToolCallDelta

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_body(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
    rate = usage.acceptance_rate
    if rate is not None:
        body["speculative"] = {
            "draft_tokens": usage.draft_tokens,
            "accepted_tokens": usage.accepted_draft_tokens,
            "acceptance_rate": round(rate, 4),
        }
    return body


# -- logprobs shapes -----------------------------------------------------------
def chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, _, v in lp.top
                ],
            }
            for lp in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    offsets = []
    pos = offset
    for lp in items:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for t, _, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


def _tool_call_delta(d: ToolCallDelta) -> dict[str, Any]:
    fn: dict[str, Any] = {"arguments": d.arguments_fragment}
    out: dict[str, Any] = {"index": d.index, "function": fn}
    if d.name is not None:
        out["id"] = d.id
        out["type"] = "function"
        fn["name"] = d.name
    return out


def chat_finish_reason(reason: FinishReason, tool_calls: bool) -> str:
    """"length" whenever max_tokens ended the output (a cut tool call too), else "tool_calls" after a call."""
    if reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if tool_calls else FINISH_REASONS.get(reason, "stop")


# -- chat ------------------------------------------------------------------------
async def chat_response(
    generation: Generation, model_name: str, options: OutputOptions, *, want_logprobs: bool
) -> dict[str, Any]:
    results = await generation.collect(keep_logprobs=want_logprobs)
    choices = []
    for r in results:
        assert r.finish is not None  # collect raises for a choice without one
        reasoning, content, calls = parse_whole(r.text, options)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            # A call max_tokens cut short keeps its partial arguments, as the stream sent them.
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        finish = chat_finish_reason(r.finish.reason, bool(calls))
        choices.append({
            "index": r.index,
            "message": message,
            "logprobs": chat_logprobs(r.logprobs) if want_logprobs else None,
            "finish_reason": finish,
        })
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage_body(total_usage([r.finish for r in results if r.finish is not None])),
    }


async def chat_stream(
    generation: Generation,
    model_name: str,
    options: OutputOptions,
    *,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    cid = new_id("chatcmpl")
    created = int(time.time())
    head = f'{{"id":"{cid}","object":"chat.completion.chunk","created":{created},"model":{dumps(model_name)},'
    usage_null = ',"usage":null' if include_usage else ""

    def frame(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return f'data: {head}"choices":[{dumps(choice)}]{usage_null}}}\n\n'

    def delta_frames(index: int, d: ChatDeltas, logprobs: Any) -> list[str]:
        out = []
        if d.reasoning:
            out.append(frame(index, {"reasoning_content": d.reasoning}, None))
        if d.content or (logprobs and not d.tool_calls):
            out.append(frame(index, {"content": d.content}, None, logprobs))
            logprobs = None
        if d.tool_calls:  # the tokens that wrote a call keep their logprobs too
            out.append(frame(index, {"tool_calls": [_tool_call_delta(t) for t in d.tool_calls]}, None, logprobs))
        return out

    outputs = [ChatOutput(options) for _ in generation.handles]
    for i in range(len(outputs)):
        yield frame(i, {"role": "assistant", "content": ""}, None)
    finishes: list[Finished] = []
    async with aclosing(generation.events()) as events:
        async for i, ev in events:
            if isinstance(ev, TextDelta):
                lps = chat_logprobs(ev.logprobs) if want_logprobs and ev.logprobs else None
                for f in delta_frames(i, outputs[i].feed(ev.text), lps):
                    yield f
                continue
            failure = generation.failure(ev)
            if failure is not None:
                raise failure
            finishes.append(ev)
            for f in delta_frames(i, outputs[i].finish(), None):
                yield f
            yield frame(i, {}, chat_finish_reason(ev.reason, outputs[i].saw_tool_call))
    if include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [], "usage": usage_body(total_usage(finishes))}
        yield f"data: {dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


# -- text completions ----------------------------------------------------------
async def completion_response(
    generations: list[Generation], model_name: str, echo_texts: list[str], *, want_logprobs: bool
) -> dict[str, Any]:
    """One choice per prompt and n: choice p * n + i is prompt p's i-th."""
    choices: list[dict[str, Any]] = []
    usage = Usage()
    for p, generation in enumerate(generations):
        results = await generation.collect(keep_logprobs=want_logprobs)
        group_finishes = []
        for r in results:
            assert r.finish is not None  # collect raises for a choice without one
            group_finishes.append(r.finish)
            echo = echo_texts[p] if echo_texts else ""
            choices.append({
                "index": p * len(results) + r.index,
                "text": echo + r.text,
                "logprobs": completion_logprobs(r.logprobs, len(echo)) if want_logprobs else None,
                "finish_reason": FINISH_REASONS.get(r.finish.reason, "stop"),
            })
        g = total_usage(group_finishes)
        usage.prompt_tokens += g.prompt_tokens
        usage.completion_tokens += g.completion_tokens
        usage.cached_tokens += g.cached_tokens
        usage.draft_tokens += g.draft_tokens
        usage.accepted_draft_tokens += g.accepted_draft_tokens
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": usage_body(usage),
    }


async def completion_stream(
    generation: Generation,
    model_name: str,
    *,
    include_usage: bool,
    want_logprobs: bool,
    echo_text: str = "",
) -> AsyncIterator[str]:
    cid = new_id("cmpl")
    created = int(time.time())
    head = f'{{"id":"{cid}","object":"text_completion","created":{created},"model":{dumps(model_name)},'
    usage_null = ',"usage":null' if include_usage else ""
    offsets = [len(echo_text)] * len(generation.handles)

    def frame(index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return f'data: {head}"choices":[{dumps(choice)}]{usage_null}}}\n\n'

    if echo_text:
        for i in range(len(offsets)):
            yield frame(i, echo_text, None)
    finishes: list[Finished] = []
    async with aclosing(generation.events()) as events:
        async for i, ev in events:
            if isinstance(ev, TextDelta):
                if ev.text or (want_logprobs and ev.logprobs):
                    lps = completion_logprobs(ev.logprobs, offsets[i]) if want_logprobs else None
                    offsets[i] += len(ev.text)
                    yield frame(i, ev.text, None, lps)
                continue
            failure = generation.failure(ev)
            if failure is not None:
                raise failure
            finishes.append(ev)
            yield frame(i, "", FINISH_REASONS.get(ev.reason, "stop"))
    if include_usage:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [], "usage": usage_body(total_usage(finishes))}
        yield f"data: {dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
