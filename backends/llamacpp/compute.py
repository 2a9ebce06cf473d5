"""The one OS thread on which every llama.cpp graph of the process is computed (decode, encode, images).

llama.cpp's CPU backend runs each graph with OpenMP, and libgomp keeps a team of
worker threads for every thread that starts a parallel region. While the
process holds more of those threads than it has CPUs, libgomp's barriers stop
spinning (100 turns instead of ~300,000) and sleep in the kernel at each of the
hundreds of barriers of a decode. Two engine threads that have each decoded
once are enough on a 2-core machine, and from then on every model ran ~40%
slower, the idle ones' teams included. So engines keep their own scheduling
threads but hand each computation to this one thread, which owns the only team.

`ComputeThread.shared()` is the process's instance: libgomp's thread count is
per process, so the thread that answers it is too. A call costs a hand-over of
a few tens of microseconds (a decode takes milliseconds); a call made on the
compute thread itself runs in place.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


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
    """Runs submitted calls one at a time on its own daemon thread, for the life of the process."""

    _shared: ClassVar[ComputeThread | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
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

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the compute thread; blocks until it returns, and raises what it raised."""
        if threading.get_ident() == self.ident:
            return fn(*args)
        item = _Call(fn, args)
        self._calls.put(item)
        item.done.acquire()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    def _serve(self) -> None:
        calls = self._calls
        while True:
            item = calls.get()
            try:
                item.result = item.fn(*item.args)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller, who raises it
                item.error = exc
            finally:
                item.done.release()
