"""A llama.cpp scheduler that fails: every request in flight ends with an error, later ones are told why.

The failure is made inside admission, where a request is between the queue and
a slot: it must end like the others, not wait forever. Closing the failed
engine still frees the model; over HTTP, /health says which model failed and
a reload brings it back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backends.base import Finished, FinishReason, GenerationRequest, LoadOptions
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams
from common.errors import ServiceUnavailableError
from tests.conftest import MODEL_NAME, make_config, wait_loaded


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


def test_over_http_a_failed_engine_shows_in_health_refuses_clearly_and_a_reload_recovers(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, network={"disable_auth": True})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        engine = client.app.state.models.loaded[MODEL_NAME].engine

        def broken(keep: object) -> None:
            raise RuntimeError("parking broke")

        monkeypatch.setattr(engine._scheduler._parking, "park_idle", broken)
        # A stream caught by the failure ends with the dialect's error frame, then [DONE].
        with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "stream": True}) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and data[-1] == "[DONE]"
        assert "parking broke" in json.loads(data[-2])["error"]["message"]

        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unhealthy"
        assert body["models"][MODEL_NAME]["state"] == "failed"
        assert "RuntimeError: parking broke" in body["models"][MODEL_NAME]["failure"]
        assert any("reload it" in issue["description"] for issue in body["issues"])

        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "engine_failed" and "parking broke" in error["message"]
        assert "POST /v1/model/load" in error["message"]

        with client.stream("POST", "/v1/model/load", json={"model_name": MODEL_NAME}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["status"] == "finished"
        assert client.get("/health").json()["status"] == "healthy"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
