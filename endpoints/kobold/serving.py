"""KoboldAI response framing: the /generate JSON and the /generate/stream SSE frames.

Both keep the registry entry's text up to date (for /api/extra/generate/check)
and mark it finished however they end. An aborted generation ends like a
stopped one, with the text produced so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from loguru import logger

from backends.base import Finished, FinishReason, TextDelta
from common.errors import APIError, EngineError
from common.generation.pipeline import Generation
from endpoints.http.streaming import dumps
from endpoints.kobold.genkeys import GenEntry, GenRegistry


def finish_reason(finish: Finished) -> str:
    return "length" if finish.reason is FinishReason.LENGTH else "stop"


def failure_of(finish: Finished | None, entry: GenEntry) -> APIError | None:
    """The error a finished generation should surface, if any: the pipeline's, or a cancel that was
    not the client's abort."""
    failure = Generation.failure(finish)
    if failure is None and finish is not None and finish.reason is FinishReason.CANCELLED and not entry.aborted:
        return EngineError("The generation was cancelled by the server. Retry the request.")
    return failure


def _final_text(text: str, finish: Finished, trim_stop: bool) -> str:
    # KoboldCpp keeps the matched stop sequence in the output when trim_stop is false.
    return text + (finish.stop_string or "") if not trim_stop else text


async def generate_response(
    generation: Generation, entry: GenEntry, registry: GenRegistry, *, trim_stop: bool
) -> dict[str, Any]:
    """Collect every choice; the first choice's text is visible to /check as it grows."""
    n = len(generation.handles)
    parts: list[list[str]] = [[] for _ in range(n)]
    finishes: list[Finished | None] = [None] * n
    try:
        async with aclosing(generation.events()) as events:
            async for i, ev in events:
                if isinstance(ev, TextDelta):
                    parts[i].append(ev.text)
                    if i == 0:
                        entry.append(ev.text)
                else:
                    finishes[i] = ev
    finally:
        registry.finish(entry)
    results: list[dict[str, Any]] = []
    for i, finish in enumerate(finishes):
        failure = failure_of(finish, entry)
        if failure is not None:
            raise failure
        assert finish is not None  # a missing finish is a failure
        results.append({
            "text": _final_text("".join(parts[i]), finish, trim_stop),
            "finish_reason": finish_reason(finish),
            "logprobs": None,
            "prompt_tokens": finish.usage.prompt_tokens,
            "completion_tokens": finish.usage.completion_tokens,
        })
    logger.debug("Kobold generation {} done: {}", entry.genkey, [r["finish_reason"] for r in results])
    return {"results": results}


def sse_frame(token: str, reason: str | None) -> str:
    return f"event: message\ndata: {dumps({'token': token, 'finish_reason': reason})}\n\n"


async def generate_stream(
    generation: Generation, entry: GenEntry, registry: GenRegistry, *, trim_stop: bool
) -> AsyncIterator[str]:
    """`event: message` frames with one token each; the last carries finish_reason. No [DONE]."""
    try:
        async with aclosing(generation.events()) as events:
            async for _, ev in events:
                if isinstance(ev, TextDelta):
                    entry.append(ev.text)
                    if ev.text:
                        yield sse_frame(ev.text, None)
                    continue
                failure = failure_of(ev, entry)
                if failure is not None:
                    raise failure
                tail = "" if trim_stop else (ev.stop_string or "")
                yield sse_frame(tail, finish_reason(ev))
                logger.debug("Kobold stream {} done: {}", entry.genkey, ev.reason.value)
    finally:
        registry.finish(entry)
