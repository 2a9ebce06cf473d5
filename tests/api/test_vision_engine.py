"""The llama.cpp engine with a vision projector: images reach the model, share cached prefixes only with the
same image, batch with text, and fail alone (a synthetic projector: tests/fixtures/vision.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from backends.base import Finished, FinishReason, GenerationRequest, ImageInput, LoadOptions, TextDelta
from backends.llamacpp.engine import LlamaCppEngine
from backends.registry import load_engine
from backends.sampling import SamplingParams
from tests.fixtures.vision import VISION_MODEL, sample_image, vision_model_dir

IMAGE_TOKENS = 16  # (64 / 16) ** 2 with the fixture's projector


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppEngine]:
    root = vision_model_dir(tmp_path_factory.mktemp("vision"), model_path)
    options = LoadOptions(max_seq_len=1024, cache_size=4096, max_batch_size=12, chunk_size=128)
    eng = await asyncio.to_thread(load_engine, "llamacpp", root / VISION_MODEL, "vision", options)
    assert isinstance(eng, LlamaCppEngine)
    yield eng
    await eng.close()


def image(seed: int) -> ImageInput:
    data = sample_image(seed)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return ImageInput(img.tobytes(), img.width, img.height, hashlib.sha256(data).hexdigest())


def chat(engine: LlamaCppEngine, question: str = "Describe the picture.") -> str:
    return f"<|im_start|>user\n{engine.image_marker}\n{question}<|im_end|>\n<|im_start|>assistant\n"


async def run(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[str, Finished]:
    parts: list[str] = []
    async with aclosing(engine.generate(request)) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            else:
                return "".join(parts), ev
    raise AssertionError("no Finished event")


def image_request(engine: LlamaCppEngine, seed: int, n: int = 12, question: str = "Describe the picture.") -> GenerationRequest:
    media = engine.tokenize_with_images(chat(engine, question), [image(seed)], add_bos=False)
    return GenerationRequest(list(media.tokens), SamplingParams(temperature=0, max_tokens=n), media=media)


async def idle(engine: LlamaCppEngine) -> None:
    for _ in range(300):
        s = engine.stats()
        if s.slots_active == 0 and s.queue_depth == 0:
            engine.check_consistency()
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


@pytest.mark.asyncio(loop_scope="module")
async def test_the_image_reaches_the_model(engine: LlamaCppEngine) -> None:
    assert engine.info.modalities == ("text", "vision")
    await engine.clear_cache()
    first, f1 = await run(engine, image_request(engine, 1))
    other, _ = await run(engine, image_request(engine, 2))
    assert f1.reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert f1.usage.prompt_tokens > IMAGE_TOKENS
    assert first != other, "two different images gave the same greedy text: the image did not reach the model"
    await engine.clear_cache()
    again, _ = await run(engine, image_request(engine, 1))
    assert again == first  # same request, same (empty) cache state: bit for bit
    await idle(engine)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_cached_image_prefix_is_reused_only_for_the_same_image(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    cold, c1 = await run(engine, image_request(engine, 3))
    warm, c2 = await run(engine, image_request(engine, 3))
    # The whole prompt, image included, comes from the cache; the first token is sampled from the logits
    # the cold run computed, so the output is the same (README: Equality of outputs).
    assert c2.usage.cached_tokens == c2.usage.prompt_tokens
    assert warm == cold
    _, c3 = await run(engine, image_request(engine, 4))
    media = engine.tokenize_with_images(chat(engine), [image(4)], add_bos=False)
    image_start = media.spans[0].start
    assert c3.usage.cached_tokens <= image_start, "a different image was served from the cached one"
    await idle(engine)


@pytest.mark.asyncio(loop_scope="module")
async def test_image_and_text_requests_batch_together_and_leave_the_cache_clean(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    texts = [f"Write a sentence about the number {i}." for i in range(8)]
    requests = [image_request(engine, 10 + i, n=10) for i in range(4)] + [
        GenerationRequest(
            engine.tokenize(f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True),
            SamplingParams(temperature=0, max_tokens=10),
        )
        for t in texts
    ]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    for text, finish in results:
        assert finish.reason in (FinishReason.LENGTH, FinishReason.STOP), finish
        assert finish.usage.completion_tokens > 0
        assert text
    await idle(engine)
    assert engine.stats().kv_cells_used == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_an_encoder_failure_ends_only_its_request(engine: LlamaCppEngine) -> None:
    await engine.clear_cache()
    bad = image(99)
    encoder = engine.encoder
    assert encoder is not None
    encoder.fail_if = lambda key: key.startswith(bad.digest)
    try:
        media = engine.tokenize_with_images(chat(engine), [bad], add_bos=False)
        failing = GenerationRequest(list(media.tokens), SamplingParams(temperature=0, max_tokens=8), media=media)
        others = [image_request(engine, 20 + i, n=8) for i in range(2)] + [
            GenerationRequest(engine.tokenize("Once upon a time", add_bos=False, special=True),
                              SamplingParams(temperature=0, max_tokens=8))
        ]
        results = await asyncio.gather(run(engine, failing), *(run(engine, r) for r in others))
    finally:
        encoder.fail_if = None
    _, failed = results[0]
    assert failed.reason is FinishReason.ERROR
    assert failed.error and "could not be encoded" in failed.error
    for _, finish in results[1:]:
        assert finish.reason in (FinishReason.LENGTH, FinishReason.STOP)
    await idle(engine)
