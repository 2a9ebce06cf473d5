"""The process's llama.cpp compute thread (backends/llamacpp/compute.py): calls run there, one at a time,
with results and errors handed back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from backends.llamacpp.compute import ComputeThread


def test_calls_run_on_the_compute_thread_and_return_their_result() -> None:
    compute = ComputeThread()
    assert compute.call(lambda a, b: (a + b, threading.get_ident()), 2, 3) == (5, compute.ident)


def test_an_error_reaches_the_caller_and_the_thread_keeps_serving() -> None:
    compute = ComputeThread()

    def fail() -> None:
        raise ValueError("decode failed")

    with pytest.raises(ValueError, match="decode failed"):
        compute.call(fail)
    assert compute.call(lambda: 7) == 7


def test_a_call_from_the_compute_thread_runs_in_place() -> None:
    compute = ComputeThread()
    assert compute.call(lambda: compute.call(lambda: threading.get_ident())) == compute.ident


def test_calls_from_many_threads_never_overlap() -> None:
    compute = ComputeThread()
    running = 0
    overlaps = 0
    done = 0

    def work() -> None:
        nonlocal running, overlaps, done
        running += 1
        overlaps += running > 1
        sum(range(2000))
        running -= 1
        done += 1

    threads = [threading.Thread(target=lambda: [compute.call(work) for _ in range(50)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == 300 and overlaps == 0


def test_the_process_has_one_shared_instance() -> None:
    assert ComputeThread.shared() is ComputeThread.shared()


def wait_until(done: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the compute thread did not get to it"
        time.sleep(0.005)


class Loop:
    """An engine loop with `work` passes to run; records on which thread each pass ran."""

    def __init__(self, work: int) -> None:
        self.work = work
        self.closed = False
        self.threads: list[int] = []
        self.ended = threading.Event()

    def ready(self) -> bool:
        return self.work > 0 or self.closed

    def run_pass(self) -> bool:
        self.threads.append(threading.get_ident())
        if self.closed:
            self.ended.set()
            return False
        self.work -= 1
        return True


def test_attached_loops_take_turns_on_the_thread_until_they_end() -> None:
    compute = ComputeThread()
    a, b = Loop(5), Loop(3)
    compute.attach(a)
    compute.attach(b)
    assert compute.call(lambda: a.work + b.work) >= 0  # calls run between passes
    wait_until(lambda: a.work == b.work == 0)
    assert set(a.threads) == set(b.threads) == {compute.ident}
    a.closed = True
    compute.wake()
    assert a.ended.wait(5)
    passes = len(a.threads)
    b.work = 2  # a was dropped: only b runs now
    compute.wake()
    wait_until(lambda: b.work == 0)
    assert len(a.threads) == passes


def test_an_idle_thread_sleeps_until_woken() -> None:
    compute = ComputeThread()
    loop = Loop(0)
    compute.attach(loop)
    time.sleep(0.05)
    assert compute.call(lambda: len(loop.threads)) == 0  # never ready: never run
    loop.work = 1
    compute.wake()
    wait_until(lambda: loop.work == 0)
    assert loop.threads == [compute.ident]


def test_a_loop_that_raises_is_dropped_and_the_thread_keeps_serving() -> None:
    compute = ComputeThread()

    class Broken(Loop):
        def run_pass(self) -> bool:
            self.threads.append(threading.get_ident())
            raise RuntimeError("bug")

    broken, good = Broken(1), Loop(2)
    compute.attach(broken)
    compute.attach(good)
    wait_until(lambda: good.work == 0)
    broken.work = 1
    good.work = 1
    compute.wake()
    wait_until(lambda: good.work == 0)
    assert len(broken.threads) == 1
    assert compute.call(lambda: 3) == 3


def test_contended_is_set_from_before_a_pass_until_a_turn_runs_none() -> None:
    compute = ComputeThread()
    seen: list[bool] = []

    class Watching(Loop):
        def run_pass(self) -> bool:
            seen.append(compute.contended)  # what another thread reads while this pass delivers
            return super().run_pass()

    loop = Watching(3)
    assert not compute.contended
    compute.attach(loop)
    wait_until(lambda: loop.work == 0)
    assert seen == [True, True, True]
    compute.call(lambda: None)  # runs in a turn where no loop is ready: that turn clears the flag
    wait_until(lambda: not compute.contended)


def test_an_embedding_pass_is_cut_to_its_share_only_while_engine_loops_run() -> None:
    from backends.llamacpp.embedding import SHARED_PASS_FIRST_TOKENS, SHARED_PASS_SECONDS, pass_budget

    assert pass_budget(1024, False, 0.0) == 1024
    assert pass_budget(1024, False, 100.0) == 1024
    assert pass_budget(1024, True, 0.0) == SHARED_PASS_FIRST_TOKENS  # speed not measured yet
    assert pass_budget(1024, True, 4000.0) == int(4000 * SHARED_PASS_SECONDS)
    assert pass_budget(1024, True, 1e9) == 1024  # never more than a whole pass
    assert pass_budget(1024, True, 1.0) == 1  # at least something (and the worker always takes one input)
