"""The one OS thread on which every llama.cpp graph of the process is computed: it runs every text
engine's scheduler, and decodes, encodes and image encodings that other threads hand it.

llama.cpp's CPU backend runs each graph with OpenMP, and libgomp keeps a team of
worker threads for every thread that starts a parallel region. While the
process holds more of those threads than it has CPUs, libgomp's barriers stop
spinning (100 turns instead of ~300,000) and sleep in the kernel at each of the
hundreds of barriers of a decode. Two engine threads that had each decoded once
were enough on a 2-core machine, and from then on every model ran ~40% slower,
the idle ones' teams included.

So the schedulers of all llama.cpp text engines take turns on this thread (one
pass each: messages, admission, one step, delivery), which with one model is
exactly what that model's own thread used to do, with no hand-over. Other
threads (the embedding worker, the image encoder, a projector's warm-up) hand
their computations over with `call`, at a few tens of microseconds each; they
run between scheduler passes.

`contended` tells those other threads whether engine loops are running passes
now, so that they keep each handed-over computation short meanwhile (the
embedding worker shrinks its passes: a stream waits for each of them).

`ComputeThread.shared()` is the process's instance: libgomp's thread count is
per process, so the thread that answers it is too.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

from loguru import logger

T = TypeVar("T")


class EngineLoop(Protocol):
    """What the compute thread runs for a text engine (the llama.cpp `Scheduler`)."""

    def ready(self) -> bool:
        """Whether a pass has anything to do (a message, a closed inbox, or work under way)."""

    def run_pass(self) -> bool:
        """One pass; False once the engine has ended (it is then dropped)."""


class _Call:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeThread:
    """Runs attached engine loops in turn and handed-over calls between their passes, on one daemon thread."""

    _shared: ClassVar[ComputeThread | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._calls: deque[_Call] = deque()
        self._loops: list[EngineLoop] = []
        self._wake = threading.Event()
        self.contended = False  # from the start of a pass until a turn runs none (read from any thread)
        self._thread = threading.Thread(target=self._serve, name="llamacpp-compute", daemon=True)
        self._thread.start()
        self.ident = self._thread.ident

    @classmethod
    def shared(cls) -> ComputeThread:
        """The process's compute thread (started on first use)."""
        if cls._shared is None:
            with cls._shared_lock:
                if cls._shared is None:
                    cls._shared = ComputeThread()
        return cls._shared

    def attach(self, loop: EngineLoop) -> None:
        """Run `loop` from now on, until a pass returns False."""
        self._calls.append(_Call(self._loops.append, (loop,)))  # the list is only touched on the thread
        self._wake.set()

    def wake(self) -> None:
        """Something was posted to an attached loop (any thread)."""
        self._wake.set()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the compute thread; blocks until it returns, and raises what it raised."""
        if threading.get_ident() == self.ident:
            return fn(*args)
        item = _Call(fn, args)
        self._calls.append(item)
        self._wake.set()
        item.done.acquire()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    def _serve(self) -> None:
        calls, loops, wake = self._calls, self._loops, self._wake
        while True:
            wake.clear()  # before looking: a post from now on wakes the wait below
            worked = False
            while calls:
                worked = True
                item = calls.popleft()
                try:
                    item.result = item.fn(*item.args)
                except BaseException as exc:  # noqa: BLE001 - handed back to the caller, who raises it
                    item.error = exc
                finally:
                    item.done.release()
            passes = False
            for loop in list(loops):
                try:
                    if not loop.ready():
                        continue
                    worked = passes = True
                    self.contended = True  # before the pass: its events may reach another thread first
                    alive = loop.run_pass()
                except Exception:  # noqa: BLE001 - a loop reports its own failures; one that raises is dropped
                    logger.exception("an engine loop failed outside its own error handling; it stops")
                    alive = False
                if not alive:
                    loops.remove(loop)
            if not passes:
                self.contended = False
            if not worked:
                wake.wait()
