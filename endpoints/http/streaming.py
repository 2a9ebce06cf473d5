"""Response plumbing shared by every dialect: SSE/NDJSON framing, error frames,
and racing a non-streaming request against the client's disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from loguru import logger
from starlette.responses import StreamingResponse

from backends.base import GenerationHandle
from common.errors import APIError, ClientClosedError, Dialect, EngineError

T = TypeVar("T")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_of(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    logger.opt(exception=exc).error("Unexpected failure while streaming")
    return EngineError(f"The server failed while generating ({type(exc).__name__}). Retry the request.")


async def _guarded(
    frames: AsyncIterator[str], on_error: Callable[[APIError], list[str]]
) -> AsyncIterator[str]:
    """Yield frames; an exception mid-stream becomes the dialect's final error frame."""
    try:
        async for frame in frames:
            yield frame
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into an error frame
        for frame in on_error(error_of(exc)):
            yield frame


class _OwningStreamingResponse(StreamingResponse):
    """Cancels its generations when the response ends, even if the body never started
    (a client that leaves before the first byte would otherwise leave them running),
    then runs `on_close` (which releases the request's model lease)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        handles: Sequence[GenerationHandle],
        on_close: Callable[[], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self._handles = handles
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self._handles:
                handle.cancel()
            if self._on_close is not None:
                self._on_close()


class EventStream(StreamingResponse):
    """For `response_class=` on a route that always streams, with `event_stream_200` in its `responses=`.

    It has no media type of its own, so FastAPI gives the 200 no JSON body and
    keeps the route's 4xx/5xx as the JSON error bodies they are on the wire
    (a media type here would be stamped on those too)."""

    media_type = None


def event_stream_200(description: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry declaring the 200 as server-sent events (what `sse_response` sends)."""
    return {200: {"description": description, "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def sse_response(
    frames: AsyncIterator[str],
    dialect: Dialect,
    *,
    done_marker: bool = True,
    handles: Sequence[GenerationHandle] = (),
    on_close: Callable[[], None] | None = None,
) -> StreamingResponse:
    """Server-sent events. `frames` yields already-encoded `data: ...\\n\\n` strings;
    `on_close` runs once the response has ended, however it ended."""

    def on_error(err: APIError) -> list[str]:
        out = [f"data: {dumps(err.body(dialect))}\n\n"]
        if dialect in (Dialect.KOBOLD, Dialect.ANTHROPIC):
            out = [f"event: error\ndata: {dumps(err.body(dialect))}\n\n"]
        if done_marker:
            out.append("data: [DONE]\n\n")
        return out

    return _OwningStreamingResponse(
        _guarded(frames, on_error),
        handles,
        on_close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def ndjson_response(
    lines: AsyncIterator[str],
    *,
    handles: Sequence[GenerationHandle] = (),
    on_close: Callable[[], None] | None = None,
) -> StreamingResponse:
    def on_error(err: APIError) -> list[str]:
        return [dumps(err.ollama_body()) + "\n"]

    return _OwningStreamingResponse(
        _guarded(lines, on_error), handles, on_close, media_type="application/x-ndjson"
    )


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T], handles: Sequence[GenerationHandle] = ()) -> T:
    """Run `work`; if the client disconnects first, cancel it and its generations."""
    try:
        return await _race_disconnect(request, work)
    finally:
        for handle in handles:
            handle.cancel()


async def _race_disconnect(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedError("The client disconnected; the generation was cancelled.")
    return task.result()
