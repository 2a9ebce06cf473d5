"""Running a Responses request: the response object, the generation driven into output items (streamed as
typed events or collected), and what is stored afterwards (the response, its input, conversation items)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from backends.base import Finished, FinishReason, TextDelta, Usage
from common.errors import BadRequestError, NotFoundError
from common.formats.output import ChatOutput, OutputOptions
from common.generation.pipeline import Generation
from common.store.store import Owner, Store
from endpoints.http.streaming import error_of
from endpoints.responses.output import OutputBuilder
from endpoints.responses.protocol import ResponsesRequest

MAX_CHAIN = 1000  # previous_response_id links followed at most


def usage_of(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def new_response(body: ResponsesRequest, resp_id: str, model_name: str, params: Any,
                 conversation_id: str | None) -> dict[str, Any]:
    return {
        "id": resp_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": model_name, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "store": body.store, "temperature": params.temperature, "top_p": params.top_p,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "truncation": "disabled",
        "usage": None, "user": body.user, "metadata": body.metadata or {},
    }


async def stored_context(store: Store, owner: Owner, previous_id: str) -> list[dict[str, Any]]:
    """The items a stored response saw and wrote, following previous_response_id back to the start."""
    chain: list[dict[str, Any]] = []
    next_id: str | None = previous_id
    while next_id is not None and len(chain) < MAX_CHAIN:
        record = await store.find("response", next_id, owner)
        if record is None:
            raise BadRequestError(
                f"Previous response '{next_id}' is not stored here (it was created with store=false, deleted, "
                "belongs to another API key, or never existed). Send the whole context as input instead.",
                param="previous_response_id", code="previous_response_not_found",
            )
        chain.append(record.data)
        next_id = record.data["response"].get("previous_response_id")
    items: list[dict[str, Any]] = []
    for data in reversed(chain):
        items += data["input"] + data["response"]["output"]
    return items


def _settle(response: dict[str, Any], finish: Finished) -> None:
    if finish.reason is FinishReason.LENGTH:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"
    response["usage"] = usage_of(finish.usage)


async def drive(generation: Generation, response: dict[str, Any], options: OutputOptions,
                finish: Callable[[dict[str, Any]], Awaitable[None]], builder: OutputBuilder) -> AsyncIterator[str]:
    """The events of a response from its first to its last; a failure is raised (`stream` frames it).
    `finish` runs (stores) before the last event, so a client that saw it finds the response stored."""
    yield builder.event("response.created", response=dict(response, output=[]))
    yield builder.event("response.in_progress", response=dict(response, output=[]))
    parser = ChatOutput(options)
    async with aclosing(generation.events()) as events:
        async for _, ev in events:
            if isinstance(ev, TextDelta):
                for frame in builder.feed(parser.feed(ev.text)):
                    yield frame
                continue
            failure = generation.failure(ev)
            if failure is not None:
                raise failure
            for frame in builder.feed(parser.finish()):
                yield frame
            for frame in builder.close(ensure_message=True):
                yield frame
            _settle(response, ev)
    await finish(response)
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield builder.event(kind, response=response)


async def stream(frames: AsyncIterator[str], response: dict[str, Any], builder: OutputBuilder) -> AsyncIterator[str]:
    """`drive`'s frames, with a failure turned into an `error` event and `response.failed`."""
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:  # noqa: BLE001 - becomes the stream's last events
        err = error_of(exc)
        response["status"] = "failed"
        response["error"] = {"code": err.code, "message": err.message}
        yield builder.event("error", code=err.code, message=err.message, param=err.param)
        yield builder.event("response.failed", response=response)


async def collect(frames: AsyncIterator[str], response: dict[str, Any]) -> dict[str, Any]:
    async with aclosing(frames) as it:
        async for _ in it:
            pass
    return response


def item_page(items: list[dict[str, Any]], *, limit: int, order: str, after: str | None) -> dict[str, Any]:
    """A cursor page over a list of items held in one object (a response's input)."""
    if order not in ("asc", "desc"):
        raise BadRequestError(f"order is {order!r}; use 'asc' or 'desc'.", param="order")
    if not 1 <= limit <= 100:
        raise BadRequestError(f"limit is {limit}; ask for 1 to 100 items per page.", param="limit")
    ordered = items if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise NotFoundError(f"'after' is '{after}', which is not an item of this list; pass an id from the "
                                "previous page.", param="after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}

