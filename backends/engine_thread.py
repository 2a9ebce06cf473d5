"""The hand-off between event loops and an engine's own thread: typed messages in an `Inbox`, events back to handles.

Engines whose work runs on one thread of their own (llama.cpp's scheduler,
transformers' batching manager, the exllama job loop) share this: event loops
post `Submit`, `Cancel` and `Command` to the `Inbox`, which the thread takes
all at once between steps, in the order posted; the inbox also counts requests
submitted and not yet finished, which bounds the queue. Events go back to each
request's `RequestHandle` through `loop.call_soon_threadsafe(deliver, ...)`,
one call per event loop per step. A handle's queue is a deque with at most one
waiting future: a step's events for one request cost one wake-up, and events
already there are taken without awaiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from backends.base import Event, Finished, GenerationHandle, GenerationRequest, Usage
from common.errors import ModelNotLoadedError, ServiceUnavailableError


class RequestHandle(GenerationHandle):
    """What an engine's `submit` returns; lives on the event loop that submitted the request."""

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


def deliver_all(outbox: Iterable[tuple[RequestHandle, list[Event]]]) -> None:
    """From the engine thread: hand each handle its events, one call per event loop (closed loops are skipped)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, list[Event]]]] = {}
    for handle, events in outbox:
        by_loop.setdefault(handle.loop, []).append((handle, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, items)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass


def timed_usage(n_prompt: int, n_generated: int, t_submit: float, t_admit: float, t_first: float,
                **counts: int) -> Usage:
    """A request's usage as it finishes now: queue, prompt and generation time from its timestamps (0 = not yet)."""
    end = time.perf_counter()
    admitted = t_admit or end
    first = t_first or end
    return Usage(
        prompt_tokens=n_prompt,
        completion_tokens=n_generated,
        queue_seconds=admitted - t_submit,
        prompt_seconds=max(0.0, first - admitted),
        generation_seconds=max(0.0, end - first),
        **counts,
    )


@dataclass(frozen=True, slots=True)
class Submit:
    job: Any  # the engine's own record of one request (or its handle), carrying the RequestHandle


@dataclass(frozen=True, slots=True)
class Cancel:
    handle: RequestHandle


@dataclass(frozen=True, slots=True)
class Command:
    """Work on the engine thread's state, between steps."""

    run: Callable[[], None]
    abandon: Callable[[], None]  # instead of run: the engine closed first


Message = Submit | Cancel | Command


class InboxClosed(Exception):
    """The engine is closing or its thread failed."""


class InboxFull(Exception):
    def __init__(self, outstanding: int) -> None:
        super().__init__(f"{outstanding} requests outstanding")
        self.outstanding = outstanding


class Inbox:
    """Thread-safe: any event loop posts; the engine thread takes and retires."""

    def __init__(self, capacity: int, wake: Callable[[], None] | None = None) -> None:
        """`wake`: also called after every post and the close (a thread serving several inboxes)."""
        self._wake = wake
        self._cv = threading.Condition(threading.Lock())
        self._messages: deque[Any] = deque()
        self._closed = False
        self.failure: str | None = None  # why the engine thread stopped, when it failed rather than closed
        self._capacity = capacity  # most requests queued or running at once
        self._outstanding = 0  # submitted and not yet finished

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def closed(self) -> bool:
        return self._closed

    def post(self, message: Any) -> None:
        """Hand `message` to the engine thread; InboxClosed, or InboxFull for a Submit over capacity."""
        with self._cv:
            if self._closed:
                raise InboxClosed
            if isinstance(message, Submit):
                if self._outstanding >= self._capacity:
                    raise InboxFull(self._outstanding)
                self._outstanding += 1
            self._messages.append(message)
            self._cv.notify()
        if self._wake is not None:
            self._wake()

    def submit(self, job: Any, model: str) -> None:
        """Post `Submit(job)`, saying what to do when the engine is full or closing."""
        try:
            self.post(Submit(job))
        except InboxFull:
            raise ServiceUnavailableError(
                "The server is busy: every slot and queue place is taken. Retry shortly.",
                retry_after=1,
                code="server_busy",
            ) from None
        except InboxClosed:
            raise self.refusal(model) from None

    def refusal(self, model: str) -> ServiceUnavailableError:
        """What a request posted after the close gets: the engine failed, or the model is unloading."""
        if self.failure is not None:
            return ServiceUnavailableError(
                f"Model '{model}' stopped serving after an engine failure ({self.failure}). Reload it "
                "(POST /v1/model/load, or unload it and send the request again); the server log has the traceback.",
                code="engine_failed",
            )
        return ModelNotLoadedError(f"Model '{model}' is unloading. Load a model and retry.")

    def cancel(self, handle: RequestHandle) -> None:
        """Post `Cancel(handle)`; nothing once closed (the thread ends every request as it stops)."""
        try:
            self.post(Cancel(handle))
        except InboxClosed:
            pass

    def take(self, wait: bool) -> list[Any] | None:
        """Everything posted so far (waiting for a message first when `wait`); None once closed."""
        with self._cv:
            while wait and not self._messages and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            if not self._messages:
                return []
            messages = list(self._messages)
            self._messages.clear()
            return messages

    def pending(self) -> bool:
        """Whether a take would return something (messages, or None once closed)."""
        return bool(self._messages) or self._closed

    def wait(self, timeout: float) -> None:
        """Sleep until a post, the close, or `timeout` seconds (engine thread, when it polls)."""
        with self._cv:
            if not self._messages and not self._closed:
                self._cv.wait(timeout)

    def retire(self) -> None:
        """One submitted request finished (engine thread)."""
        with self._cv:
            self._outstanding -= 1

    def close(self, failure: str | None = None) -> bool:
        """Refuse further posts and wake the engine thread; False when already closed.

        `failure`: the engine thread stopped on this error, which later posts are told (see `refusal`).
        """
        with self._cv:
            if self._closed:
                return False
            self._closed = True
            self.failure = failure
            self._cv.notify()
        if self._wake is not None:
            self._wake()
        return True

    def drain(self) -> list[Any]:
        """What was posted before the close (engine thread, once closed)."""
        with self._cv:
            messages = list(self._messages)
            self._messages.clear()
            return messages


async def call_on_thread(inbox: Inbox, command: Callable[[], object], model: str) -> object:
    """Run `command` on the engine thread between steps; return its result (or raise its exception)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[object] = loop.create_future()

    def settle(result: object, exc: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(_settle, done, result, exc)
        except RuntimeError:  # the caller's event loop is gone
            pass

    def run() -> None:
        try:
            result = command()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            settle(None, exc)
        else:
            settle(result, None)

    def abandon() -> None:
        settle(None, ModelNotLoadedError(f"Model '{model}' was unloaded before this change ran."))

    try:
        inbox.post(Command(run, abandon))
    except InboxClosed:
        raise inbox.refusal(model) from None
    return await done


def _settle(fut: asyncio.Future[object], result: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
