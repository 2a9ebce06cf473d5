"""A llama.cpp scheduler that fails: every request in flight ends with an error, later ones are told why.

The failure is made inside admission, where a request is between the queue and
a slot: it must end like the others, not wait forever. Closing the failed
engine still frees the model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.base import Finished, FinishReason, GenerationRequest, LoadOptions
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams
from common.errors import ServiceUnavailableError


async def collect(engine: LlamaCppEngine, tokens: list[int]) -> list[object]:
    params = SamplingParams(max_tokens=8, temperature=0)
    return [ev async for ev in engine.generate(GenerationRequest(list(tokens), params))]


@pytest.mark.asyncio
async def test_a_failure_while_admitting_ends_the_request_and_is_named_afterwards(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = LoadOptions(max_seq_len=512, cache_size=1024, max_batch_size=2)
    engine = await asyncio.to_thread(LlamaCppEngine.load, model_path, "smol", options)
    freed: list[bool] = []
    try:
        tokens = engine.tokenize("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
                                 add_bos=False, special=True)
        first = await asyncio.wait_for(collect(engine, tokens), 120)  # a healthy engine first
        assert isinstance(first[-1], Finished) and first[-1].reason in (FinishReason.STOP, FinishReason.LENGTH)

        def broken(keep: object) -> None:
            raise RuntimeError("parking broke")

        monkeypatch.setattr(engine._scheduler._parking, "park_idle", broken)
        events = await asyncio.wait_for(collect(engine, tokens), 60)
        end = events[-1]
        assert isinstance(end, Finished)
        assert end.reason is FinishReason.ERROR
        assert end.error is not None and "parking broke" in end.error and "Reload" in end.error

        with pytest.raises(ServiceUnavailableError) as refused:
            engine.submit(GenerationRequest(list(tokens), SamplingParams(max_tokens=4)))
        assert refused.value.status == 503
        assert refused.value.code == "engine_failed"
        assert "RuntimeError: parking broke" in refused.value.message
        assert "POST /v1/model/load" in refused.value.message
        native_free = engine.native.free
        monkeypatch.setattr(engine.native, "free", lambda: (freed.append(True), native_free())[1])
    finally:
        await engine.close()
    assert freed == [True], "closing a failed engine must still free the model and its context"
