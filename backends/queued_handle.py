"""The event-loop side of a request served by an engine thread: an event queue, events() and cancel().

Engines whose work runs on their own thread (transformers, exllamav2,
exllamav3) hand a request's events to its event loop with `post_events`, which
queues them in order through `loop.call_soon_threadsafe`; the handle's reader
awaits them. Leaving `events()` early cancels the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from backends.base import Event, Finished, GenerationHandle, GenerationRequest


class QueuedHandle(GenerationHandle):
    """Lives on the event loop that submitted the request; the engine thread only calls post_events."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[QueuedHandle], None],
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


def _put_all(handle: QueuedHandle, events: list[Event]) -> None:
    put = handle.queue.put_nowait
    for event in events:
        put(event)


def post_events(handle: QueuedHandle, events: list[Event]) -> None:
    """From any thread: queue `events` on the handle's loop (dropped when that loop is gone)."""
    if not events:
        return
    try:
        handle.loop.call_soon_threadsafe(_put_all, handle, events)
    except RuntimeError:  # the event loop closed: nobody is reading
        pass
