"""The llama.cpp scheduler with the real model: batching, prefix reuse, cancellation, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
import pytest_asyncio

from backends.base import Finished, FinishReason, GenerationRequest, LoadOptions, TextDelta
from backends.llamacpp.engine import LlamaCppEngine
from common.errors import ModelNotLoadedError, ServiceUnavailableError
from backends.sampling import SamplingParams
from tests.neartie import Step, assert_agree, steps_from_engine

PROMPTS = [
    "The history of the Roman Empire",
    "How to bake bread at home:",
    "A list of prime numbers: 2, 3, 5,",
    "Dear diary, today I",
    "The best way to learn Python is",
    "In a galaxy far away",
    "Recipe for pancakes:",
    "The mitochondria is",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path) -> AsyncIterator[LlamaCppEngine]:
    options = LoadOptions(max_seq_len=2048, cache_size=8192, max_batch_size=8, chunk_size=128, max_queue=4)
    eng = await asyncio.to_thread(LlamaCppEngine.load, model_path, "smol", options)
    yield eng
    await eng.close()


def greedy(n: int = 24, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)  # type: ignore[arg-type]


async def run(engine: LlamaCppEngine, prompt: str | list[int], params: SamplingParams) -> tuple[str, Finished]:
    tokens = engine.tokenize(prompt, add_bos=False, special=True) if isinstance(prompt, str) else prompt
    parts: list[str] = []
    async with aclosing(engine.generate(GenerationRequest(tokens, params))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            else:
                return "".join(parts), ev
    raise AssertionError("no Finished event")


async def idle(engine: LlamaCppEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.slots_active == 0 and s.queue_depth == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def run_steps(engine: LlamaCppEngine, prompt: str, params: SamplingParams) -> tuple[list[Step], Finished]:
    """Like run, keeping each token's top candidates for a near-tie comparison."""
    tokens = engine.tokenize(prompt, add_bos=False, special=True)
    logprobs = []
    async with aclosing(engine.generate(GenerationRequest(tokens, params))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                logprobs.extend(ev.logprobs)
            else:
                return steps_from_engine(logprobs), ev
    raise AssertionError("no Finished event")


@pytest.mark.asyncio(loop_scope="module")
async def test_batched_greedy_equals_sequential(engine: LlamaCppEngine) -> None:
    # Batched sequences share forward passes and KV cells, so float rounding differs from a run
    # alone: compare up to the first near-tie that came out differently (tests/neartie.py).
    params = greedy(logprobs=2)
    await engine.clear_cache()
    alone = [await run_steps(engine, p, params) for p in PROMPTS]
    await engine.clear_cache()
    together = await asyncio.gather(*(run_steps(engine, p, params) for p in PROMPTS))
    for prompt, (a, _), (t, _) in zip(PROMPTS, alone, together, strict=True):
        assert_agree(a, t, label=f"{prompt!r} batched vs alone")
    assert all(f.reason in (FinishReason.STOP, FinishReason.LENGTH) for _, f in together)


SYSTEM = (
    "<|im_start|>system\nYou are Parley's test assistant. You answer questions about geography, history and "
    "science briefly and accurately. When you do not know an answer, you say so plainly. You never invent "
    "sources. You write in short, clear sentences and avoid jargon. Units are metric unless the user asks "
    "otherwise. Dates use the ISO format. Lists have at most five items. You are polite but not chatty. "
    "If a question is ambiguous, you state the most likely reading and answer that.<|im_end|>\n"
)


def chat(question: str) -> str:
    return SYSTEM + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.asyncio(loop_scope="module")
async def test_prefix_reuse_matches_cold_run_and_reports_cached(engine: LlamaCppEngine) -> None:
    # Natural prompts: on borderline ones, chunking alone can flip a greedy choice by float rounding.
    pairs = [("What is the capital of France?", "What is the largest ocean on Earth?"),
             ("Who wrote Hamlet?", "What is the boiling point of water?")]
    n_system = len(engine.tokenize(SYSTEM, add_bos=False, special=True))
    for first, second in pairs:
        await engine.clear_cache()
        cold_text, cold = await run(engine, chat(second), greedy(32))
        assert cold.usage.cached_tokens == 0
        await engine.clear_cache()
        await run(engine, chat(first), greedy(32))
        warm_text, warm = await run(engine, chat(second), greedy(32))
        assert warm_text == cold_text
        assert warm.usage.cached_tokens >= n_system
    # Concurrent requests with one shared prefix: later ones copy the first one's KV.
    await engine.clear_cache()
    results = await asyncio.gather(*(run(engine, chat(f"Name item {i}."), greedy(8)) for i in range(4)))
    assert sum(1 for _, f in results if f.usage.cached_tokens >= n_system) >= 3


@pytest.mark.asyncio(loop_scope="module")
async def test_disconnects_free_everything(model_path: Path) -> None:
    # Its own engine, with a queue long enough that 32 clients on 8 slots queue rather than being refused.
    options = LoadOptions(max_seq_len=2048, cache_size=8192, max_batch_size=8, chunk_size=128, max_queue=64)
    engine = await asyncio.to_thread(LlamaCppEngine.load, model_path, "smol-64", options)
    try:
        await _disconnects_free_everything(engine)
    finally:
        await engine.close()


async def _disconnects_free_everything(engine: LlamaCppEngine) -> None:
    async def client(i: int) -> str | None:
        tokens = engine.tokenize(PROMPTS[i % len(PROMPTS)] + f" ({i})", add_bos=False, special=True)
        params = SamplingParams(temperature=0.7, seed=i, max_tokens=48, ignore_eos=True)
        seen = 0
        async with aclosing(engine.generate(GenerationRequest(tokens, params))) as events:
            async for ev in events:
                if isinstance(ev, Finished):
                    return ev.reason.value
                seen += 1
                if i % 3 == 0 and seen >= 4:
                    return None  # leaving the iterator = the client went away
        return "no finish"

    outcomes = await asyncio.gather(*(client(i) for i in range(32)))
    survivors = [o for i, o in enumerate(outcomes) if i % 3 != 0]
    assert survivors and all(o == "length" for o in survivors)
    await idle(engine)
    stats = engine.stats()
    assert stats.slots_active == 0 and stats.queue_depth == 0 and stats.kv_cells_used == 0
    engine.check_consistency()
    text, fin = await run(engine, "Hello", greedy(4))
    assert fin.reason in (FinishReason.STOP, FinishReason.LENGTH)


@pytest.mark.asyncio(loop_scope="module")
async def test_queue_overflow_is_503_and_running_work_is_unharmed(engine: LlamaCppEngine) -> None:
    long = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tokens = engine.tokenize("Count to one hundred:", add_bos=False, special=True)
    handles = [engine.submit(GenerationRequest(tokens, long)) for _ in range(8 + 4)]  # 8 slots + 4 queued
    with pytest.raises(ServiceUnavailableError) as exc:
        for _ in range(10):
            handles.append(engine.submit(GenerationRequest(tokens, long)))
    assert exc.value.headers.get("Retry-After")
    finishes = []
    for h in handles:
        async with aclosing(h.events()) as events:
            async for ev in events:
                if isinstance(ev, Finished):
                    finishes.append(ev)
    assert len(finishes) == len(handles)
    assert all(f.reason is FinishReason.LENGTH and f.usage.completion_tokens == 64 for f in finishes)
    await idle(engine)


@pytest.mark.asyncio(loop_scope="module")
async def test_full_kv_cache_preempts_and_recomputes_without_failing(model_path: Path) -> None:
    # 4 sequences of ~20 + 100 tokens need ~480 cells; the cache has 256.
    options = LoadOptions(max_seq_len=256, cache_size=256, max_batch_size=4, chunk_size=64, max_queue=8)
    small = await asyncio.to_thread(LlamaCppEngine.load, model_path, "small", options)
    try:
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        together = await asyncio.gather(*(run(small, p, params) for p in PROMPTS[:4]))
        # Every stream completes in full; none fails because the cache ran out.
        assert all(f.reason is FinishReason.LENGTH and f.usage.completion_tokens == 100 for _, f in together), [
            (f.reason, f.usage.completion_tokens, f.error) for _, f in together]
        assert all(t.strip() for t, _ in together)
        await idle(small)
        small.check_consistency()
    finally:
        await small.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_close_ends_running_and_queued_requests_and_refuses_new_work(model_path: Path) -> None:
    options = LoadOptions(max_seq_len=512, cache_size=1024, max_batch_size=2, chunk_size=64, max_queue=8)
    eng = await asyncio.to_thread(LlamaCppEngine.load, model_path, "closing", options)
    tokens = eng.tokenize("Count to one hundred:", add_bos=False, special=True)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    handles = [eng.submit(GenerationRequest(tokens, params)) for _ in range(5)]  # 2 running, 3 queued
    events = handles[0].events()
    assert isinstance(await anext(events), TextDelta)  # the engine is mid-generation
    await eng.close()
    finishes = [ev async for ev in events if isinstance(ev, Finished)]
    for h in handles[1:]:
        finishes += [ev async for ev in h.events() if isinstance(ev, Finished)]
    assert [f.reason for f in finishes] == [FinishReason.UNLOAD] * 5
    with pytest.raises(ModelNotLoadedError):
        eng.submit(GenerationRequest(tokens, params))
    with pytest.raises(ModelNotLoadedError):
        await eng.clear_cache()
    await eng.close()  # a second close is a no-op


@pytest.mark.asyncio(loop_scope="module")
async def test_temperature_sampling_runs_through_the_compiled_draw_when_it_is_built(engine: LlamaCppEngine) -> None:
    """start.sh builds fastdraw.c: the real engine then draws plain-temperature tokens with it, and a seed
    still reproduces a generation (the second run reuses the cached prompt and its saved logits exactly)."""
    from backends.llamacpp import fastdraw

    if fastdraw.load() is None:
        pytest.skip("the compiled draw is not built on this machine (no C compiler); numpy draws instead")
    assert engine._scheduler._draw_kernel is not None
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True)
    first, done = await run(engine, PROMPTS[3], params)
    await idle(engine)
    again, _ = await run(engine, PROMPTS[3], params)
    assert done.usage.completion_tokens == 24 and first and again == first
