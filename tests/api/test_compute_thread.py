"""Two llama.cpp models in one process compute on one thread, so libgomp keeps one worker team.

libgomp keeps a team per thread that starts a parallel region; once the process holds more of
them than CPUs it stops spinning at barriers, and every model ran ~40% slower on 2 cores. A
second model that decodes must therefore start no OpenMP worker of its own."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from backends.base import GenerationRequest, LoadOptions, TextDelta
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")


def native_threads() -> int:
    """OS threads of this process that Python did not start (OpenMP workers among them)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


async def generate(engine: LlamaCppEngine) -> str:
    tokens = engine.tokenize("Once upon a time", add_bos=True, special=False)
    out = []
    async for ev in engine.generate(GenerationRequest(tokens, SamplingParams(temperature=0.0, max_tokens=8))):
        if isinstance(ev, TextDelta):
            out.append(ev.text)
    return "".join(out)


def test_a_second_model_starts_no_openmp_team_of_its_own(model_path: Path) -> None:
    async def main() -> None:
        options = LoadOptions(max_seq_len=256, max_batch_size=1, n_threads=2)
        first = await asyncio.to_thread(LlamaCppEngine.load, model_path, "a", options)
        second = None
        try:
            assert await generate(first)
            before = native_threads()
            second = await asyncio.to_thread(LlamaCppEngine.load, model_path, "b", options)
            assert await generate(second) and await generate(first)
            assert native_threads() == before
        finally:
            await first.close()
            if second is not None:
                await second.close()

    asyncio.run(main())
