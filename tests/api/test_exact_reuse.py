"""Exact reuse of cached prompts on the real model: a prompt served from cache gives the cold run's
output and the same logprobs, bit for bit (README: "Equality of outputs")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
import pytest_asyncio

from backends.base import Finished, GenerationRequest, LoadOptions, TextDelta
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams

SENTENCE = "The quick brown fox jumps over the lazy dog while the cat watches. "


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path) -> AsyncIterator[LlamaCppEngine]:
    # Small chunks so that prompts here cross chunk edges and llama.cpp's 64-row kernel switch.
    options = LoadOptions(max_seq_len=2048, cache_size=4096, max_batch_size=4, chunk_size=128)
    eng = await asyncio.to_thread(LlamaCppEngine.load, model_path, "smol", options)
    yield eng
    await eng.close()


async def run(engine: LlamaCppEngine, tokens: list[int], **kw: object) -> tuple[list[int], list[float], Finished]:
    params = SamplingParams(max_tokens=24, logprobs=2, **kw)  # type: ignore[arg-type]
    ids: list[int] = []
    lps: list[float] = []
    async with aclosing(engine.generate(GenerationRequest(list(tokens), params))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                ids.extend(ev.token_ids)
                lps.extend(lp.logprob for lp in ev.logprobs)
            else:
                return ids, lps, ev
    raise AssertionError("no Finished event")


def prompt_of(engine: LlamaCppEngine, n_sentences: int, question: str) -> list[int]:
    text = (
        "<|im_start|>user\n" + SENTENCE * n_sentences + question + "<|im_end|>\n<|im_start|>assistant\n"
    )
    return engine.tokenize(text, add_bos=False, special=True)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("n_sentences", [0, 4, 12, 40])  # ~20, ~80, ~190, ~600 tokens
async def test_cached_prompt_gives_the_cold_output_bit_for_bit(engine: LlamaCppEngine, n_sentences: int) -> None:
    tokens = prompt_of(engine, n_sentences, "Name three colors.")
    await engine.clear_cache()
    cold_ids, cold_lps, cold = await run(engine, tokens, temperature=0)
    assert cold.usage.cached_tokens == 0 and cold_ids
    for _ in range(2):
        ids, lps, fin = await run(engine, tokens, temperature=0)
        assert fin.usage.cached_tokens == len(tokens)  # nothing of the prompt was recomputed
        assert ids == cold_ids
        assert lps == cold_lps  # the same floats: the same computation, not a lucky agreement
    engine.check_consistency()


@pytest.mark.asyncio(loop_scope="module")
async def test_seeded_sampling_from_cache_repeats_the_cold_draw(engine: LlamaCppEngine) -> None:
    tokens = prompt_of(engine, 2, "Tell me a story.")
    await engine.clear_cache()
    cold_ids, _, _ = await run(engine, tokens, temperature=1.0, seed=1234)
    ids, _, fin = await run(engine, tokens, temperature=1.0, seed=1234)
    assert fin.usage.cached_tokens == len(tokens)
    assert ids == cold_ids


@pytest.mark.asyncio(loop_scope="module")
async def test_a_cached_prefix_of_another_slot_is_reused_exactly(engine: LlamaCppEngine) -> None:
    # Two identical requests at once: one computes the prompt, the other copies its KV and its logits.
    tokens = prompt_of(engine, 6, "What is a fox?")
    await engine.clear_cache()
    cold_ids, cold_lps, _ = await run(engine, tokens, temperature=0)
    engine_slots_before = engine.stats().cached_prefix_tokens
    assert engine_slots_before >= len(tokens)
    a, b = await asyncio.gather(run(engine, tokens, temperature=0), run(engine, tokens, temperature=0))
    assert {a[2].usage.cached_tokens, b[2].usage.cached_tokens} == {len(tokens)}
    # Batched with each other the decode steps differ in shape, so only the first token is exact.
    assert a[0][0] == b[0][0] == cold_ids[0] and a[1][0] == b[1][0] == cold_lps[0]
    engine.check_consistency()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_longer_prompt_reuses_the_shorter_one_and_still_computes_its_own_end(engine: LlamaCppEngine) -> None:
    short = prompt_of(engine, 3, "Name a color.")
    await engine.clear_cache()
    await run(engine, short, temperature=0)
    longer = short + engine.tokenize("Blue.<|im_end|>\n<|im_start|>user\nAnother one.<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True)
    ids, _, fin = await run(engine, longer, temperature=0)
    assert len(short) <= fin.usage.cached_tokens < len(longer)
    assert ids
    engine.check_consistency()
