"""The event-loop side of one llama.cpp request: its event queue, events() and cancel().

The scheduler thread never touches a handle's queue directly: it hands each
loop a batch of (handle, events) through `loop.call_soon_threadsafe(deliver, ...)`.
The queue is a deque with at most one waiting future: a step's events for one
request cost one wake-up, and events already there are taken without awaiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
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
        self.queue: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None  # set while events() waits for an event
        self._on_cancel = on_cancel
        self._done = False  # the Finished event came out of the queue

    async def events(self) -> AsyncIterator[Event]:
        queue = self.queue
        try:
            while not self._done:
                if not queue:
                    self._waiter = self.loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                event = queue.popleft()
                if isinstance(event, Finished):
                    self._done = True
                yield event
        finally:
            self.cancel()

    def put(self, events: list[Event]) -> None:
        """Queue events and wake events() (on the handle's loop)."""
        self.queue.extend(events)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        if not self._done:
            self._on_cancel(self)


def deliver(items: list[tuple[RequestHandle, list[Event]]]) -> None:
    """Queue each handle's events, in order (runs on the handles' event loop)."""
    for handle, events in items:
        handle.put(events)
