"""Idle slots' prefixes parked in host memory (backends/llamacpp/parking.py), on the real model.

When a request starts, the other idle slots' KV leaves the cache for host
memory; a later request reusing one copies it back instead of recomputing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
import pytest_asyncio

from backends.base import Finished, GenerationRequest, LoadOptions, TextDelta, TokenLogprob
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams
from tests.neartie import assert_agree, steps_from_engine

SENTENCE = "A lighthouse keeper counts the ships that pass the rocky point each night. "
OTHER = "Bakers in the valley rise before dawn to knead dough for the market. "


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path) -> AsyncIterator[LlamaCppEngine]:
    # A cache of 1,024 cells: four prompts of ~300 tokens overflow what parking may hold.
    options = LoadOptions(max_seq_len=1024, cache_size=1024, max_batch_size=4, chunk_size=256)
    eng = await asyncio.to_thread(LlamaCppEngine.load, model_path, "smol", options)
    yield eng
    await eng.close()


def prompt(engine: LlamaCppEngine, n: int, question: str, sentence: str = SENTENCE) -> list[int]:
    text = "<|im_start|>user\n" + sentence * n + question + "<|im_end|>\n<|im_start|>assistant\n"
    return engine.tokenize(text, add_bos=False, special=True)


async def run(engine: LlamaCppEngine, tokens: list[int], max_tokens: int = 16) -> tuple[list[TokenLogprob], Finished]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=2)
    lps: list[TokenLogprob] = []
    async with aclosing(engine.generate(GenerationRequest(list(tokens), params))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                lps.extend(ev.logprobs)
            else:
                return lps, ev
    raise AssertionError("no Finished event")


def parked_slots(engine: LlamaCppEngine) -> list[int]:
    """Sequences whose prefix is in host memory (read while the engine is idle)."""
    return [s.seq for s in engine._scheduler.slots if s.parked is not None]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_parked_prefix_is_reused_without_recomputing(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    first = prompt(engine, 6, "How many ships passed?")
    cold_lps, cold = await run(engine, first)
    assert cold.usage.cached_tokens == 0
    assert parked_slots(engine) == []  # nothing else was cached: nothing to park

    await run(engine, prompt(engine, 4, "What do they bake?", OTHER))  # shares only the chat header
    assert len(parked_slots(engine)) == 1  # the first request's slot left the cache when this one started
    engine.check_consistency()  # the parked sequence holds no cell

    again_lps, again = await run(engine, first)
    assert again.usage.cached_tokens == len(first)  # restored from host memory, not recomputed
    # The first token comes from the logits kept with the prefix: identical. Later tokens are computed
    # over restored cells that may sit elsewhere in the cache: equal up to the first near-tie.
    assert again_lps[0].token_id == cold_lps[0].token_id and again_lps[0].logprob == cold_lps[0].logprob
    assert_agree(steps_from_engine(cold_lps), steps_from_engine(again_lps), label="restored vs cold")
    assert len(parked_slots(engine)) == 1  # now the other request's slot is the parked one
    engine.check_consistency()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_parked_prefix_extended_by_the_next_turn(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    turn = prompt(engine, 5, "Who keeps the light?")
    lps, _ = await run(engine, turn, max_tokens=8)
    await run(engine, prompt(engine, 4, "What else?", OTHER), max_tokens=4)  # parks the first slot
    follow = turn + [lp.token_id for lp in lps] + engine.tokenize(
        "<|im_end|>\n<|im_start|>user\nAnd why?<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True)
    _, fin = await run(engine, follow, max_tokens=4)
    assert fin.usage.cached_tokens >= len(turn)  # the first turn came back from host memory
    engine.check_consistency()


@pytest.mark.asyncio(loop_scope="module")
async def test_parked_prefixes_never_hold_more_tokens_than_the_cache(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    # ~450 tokens each, different from the first word on: three of them overflow 1,024 parked tokens
    prompts = [engine.tokenize(f"{i} " + SENTENCE * 30, add_bos=False, special=True) for i in ("One", "Two", "Six", "Ten")]
    assert 3 * len(prompts[0]) > 1024
    for tokens in prompts:
        await run(engine, tokens, max_tokens=2)
        parking = engine._scheduler._parking
        assert parking.tokens() <= parking.max_tokens
    # The oldest prefixes were dropped to fit; the newest parked one is still there.
    kept = [s for s in engine._scheduler.slots if s.tokens]
    assert len(kept) < 4
    _, fin = await run(engine, prompts[-2], max_tokens=2)
    assert fin.usage.cached_tokens == len(prompts[-2])
    engine.check_consistency()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_park_reuses_the_host_buffer_a_restored_prefix_left(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    parking = engine._scheduler._parking
    first = prompt(engine, 6, "How many ships passed?")
    other = prompt(engine, 5, "What do they bake?", OTHER)
    await run(engine, first)
    await run(engine, other)  # parks the first prefix in a fresh buffer
    reused = parking.buffers.reused_count
    # The first prefix comes back (its buffer is freed for reuse), and the other one is parked into that buffer.
    _, fin = await run(engine, first)
    assert fin.usage.cached_tokens == len(first)
    assert parking.buffers.reused_count == reused + 1
    # And the prefix parked in the reused buffer is intact: it comes back whole.
    _, fin = await run(engine, other)
    assert fin.usage.cached_tokens == len(other)
    engine.check_consistency()
