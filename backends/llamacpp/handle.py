"""The event-loop side of one llama.cpp request: its event queue, events() and cancel().

The scheduler thread never touches a handle's queue directly: it hands each
loop a batch of (handle, events) through `loop.call_soon_threadsafe(deliver, ...)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from backends.base import Event, Finished, GenerationHandle, GenerationRequest


class RequestHandle(GenerationHandle):
    """What `LlamaCppEngine.submit` returns; lives on the event loop that submitted the request."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[RequestHandle], None],
    ) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._done = False  # the Finished event came out of the queue

    async def events(self) -> AsyncIterator[Event]:
        try:
            while not self._done:
                event = await self.queue.get()
                if isinstance(event, Finished):
                    self._done = True
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self._done:
            self._on_cancel(self)


def deliver(items: list[tuple[RequestHandle, list[Event]]]) -> None:
    """Queue each handle's events, in order (runs on the handles' event loop)."""
    for handle, events in items:
        put = handle.queue.put_nowait
        for event in events:
            put(event)
