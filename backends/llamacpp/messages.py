"""What crosses from event loops to the scheduler thread: typed messages through one `Inbox`.

Event loops post `Submit`, `Cancel` and `Command`; the scheduler thread takes
them all between steps, in the order they were posted. The inbox also keeps
the one count both sides need: requests submitted and not yet finished, which
bounds the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from backends.llamacpp.handle import RequestHandle
from backends.llamacpp.job import Job


@dataclass(frozen=True, slots=True)
class Submit:
    job: Job


@dataclass(frozen=True, slots=True)
class Cancel:
    handle: RequestHandle


@dataclass(frozen=True, slots=True)
class Command:
    """Work on the scheduler thread's state, between steps."""

    run: Callable[[], None]
    abandon: Callable[[], None]  # instead of run: the engine closed first


Message = Submit | Cancel | Command


class InboxClosed(Exception):
    """The engine is closing or its scheduler failed."""


class InboxFull(Exception):
    def __init__(self, outstanding: int) -> None:
        super().__init__(f"{outstanding} requests outstanding")
        self.outstanding = outstanding


class Inbox:
    """Thread-safe: any event loop posts; the scheduler thread takes and retires."""

    def __init__(self, capacity: int) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._messages: deque[Message] = deque()
        self._closed = False
        self._capacity = capacity  # most requests queued or running at once
        self._outstanding = 0  # submitted and not yet finished

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def closed(self) -> bool:
        return self._closed

    def post(self, message: Message) -> None:
        """Hand `message` to the scheduler thread; InboxClosed, or InboxFull for a Submit over capacity."""
        with self._cv:
            if self._closed:
                raise InboxClosed
            if isinstance(message, Submit):
                if self._outstanding >= self._capacity:
                    raise InboxFull(self._outstanding)
                self._outstanding += 1
            self._messages.append(message)
            self._cv.notify()

    def take(self, wait: bool) -> list[Message] | None:
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

    def retire(self) -> None:
        """One submitted request finished (scheduler thread)."""
        with self._cv:
            self._outstanding -= 1

    def close(self) -> bool:
        """Refuse further posts and wake the scheduler; False when already closed."""
        with self._cv:
            if self._closed:
                return False
            self._closed = True
            self._cv.notify()
            return True

    def drain(self) -> list[Message]:
        """What was posted before the close (scheduler thread, once closed)."""
        with self._cv:
            messages = list(self._messages)
            self._messages.clear()
            return messages
