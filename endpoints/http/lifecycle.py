"""Graceful shutdown: drain running generations before the process exits.

On the first SIGTERM (or Ctrl+C) the server keeps its socket open and:

1. stops admitting generations: new ones get 503 `server_draining` with
   `Retry-After`, and /health answers 503 with status "draining", so load
   balancers move traffic elsewhere; other requests are still answered;
2. lets running generations finish, for up to `network.shutdown_timeout`
   seconds;
3. ends the ones still running with the dialect's error frame (or a 500 for a
   non-streaming request), then lets uvicorn close connections, unload the
   model and exit.

A second signal skips the wait (step 3 at once).
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import uvicorn
from loguru import logger

from common.errors import ServiceUnavailableError

DRAIN_POLL_SECONDS = 0.05
ABORT_GRACE_SECONDS = 5.0  # time cut generations get to send their error frame
CUT_MESSAGE = (
    "The server is shutting down and ended this generation before it finished (it ran longer than "
    "network.shutdown_timeout). Send the request again; it will be served once the server is back."
)


class Abortable(Protocol):
    def abort(self, message: str) -> None: ...


class Lifecycle:
    """Whether the server admits generations, and which ones are running. One per app."""

    def __init__(self, shutdown_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._active: set[Abortable] = set()
        self._deadline: float | None = None
        self._stop_now = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def begin(self, generation: Abortable) -> None:
        self._active.add(generation)

    def end(self, generation: Abortable) -> None:
        self._active.discard(generation)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: until this process has drained, at least 1."""
        if self._deadline is None:
            return 1
        return max(1, math.ceil(self._deadline - self._clock()))

    def refusal(self) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            "The server is shutting down and accepts no new requests. Retry after the Retry-After "
            "seconds (another instance, or this one after its restart, will answer).",
            code="server_draining",
            retry_after=self.retry_after(),
        )

    def start_draining(self) -> None:
        if self._deadline is None:
            self._deadline = self._clock() + self.shutdown_timeout
            logger.warning(
                "Draining: {} generation(s) running get up to {:g} s to finish; new ones get 503",
                len(self._active), self.shutdown_timeout,
            )

    def stop_now(self) -> None:
        """Cut the drain short (a second signal)."""
        self.start_draining()
        self._stop_now.set()

    async def drain(self) -> int:
        """Wait for running generations (up to the timeout), then cut the rest. Returns how many were cut."""
        self.start_draining()
        assert self._deadline is not None
        while self._active and not self._stop_now.is_set():
            left = self._deadline - self._clock()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._stop_now.wait(), timeout=min(DRAIN_POLL_SECONDS, left))
            except asyncio.TimeoutError:
                pass
        cut = list(self._active)
        if cut:
            logger.warning("Draining: ending {} generation(s) that are still running", len(cut))
            for generation in cut:
                generation.abort(CUT_MESSAGE)
            grace = self._clock() + ABORT_GRACE_SECONDS
            while self._active and self._clock() < grace:
                await asyncio.sleep(DRAIN_POLL_SECONDS)
        else:
            logger.info("Draining: every generation finished")
        return len(cut)


class ParleyServer(uvicorn.Server):
    """uvicorn's server, draining generations on the first SIGTERM/SIGINT before it shuts down.

    uvicorn itself stops listening at once on a signal; here the socket stays
    open while draining, so /health can say so and new requests get a 503
    with Retry-After instead of a refused connection.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[Any] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only hand the work to the event loop.
        if self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._drain_task is None:
            logger.warning("{}: draining before exit (send it again to stop at once)", name)
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())
        else:
            logger.warning("{} again: ending running generations now", name)
            self.lifecycle.stop_now()

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True
