"""The process's llama.cpp compute thread (backends/llamacpp/compute.py): calls run there, one at a time,
with results and errors handed back."""

from __future__ import annotations

import threading

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
