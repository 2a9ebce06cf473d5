"""llama.cpp's native API over a real socket, with plain httpx: the flow of SillyTavern's
"llama.cpp" text-completion type (list models, then POST /completion), and /slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.test_llamacpp_completion import (
    CHATML_PROMPT, FRAME_FIELDS, RESULT_FIELDS, SETTINGS, TIMINGS, sillytavern_body,
)
from tests.conftest import MODEL_NAME, LiveServer


@pytest.fixture(scope="module")
def llama(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, headers=live_server.keys.api_headers(), timeout=120) as c:
        yield c


def stream_frames(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Read the SSE stream as SillyTavern does: one JSON object per `data:` line, until the body ends."""
    frames = []
    with client.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "llama-server sends no [DONE]"
                frames.append(json.loads(line[len("data: "):]))
            else:
                assert line == "", line
    return frames


def test_sillytavern_connects_and_generates(llama: httpx.Client) -> None:
    models = llama.get("/v1/models").json()["data"]
    assert MODEL_NAME in [m["id"] for m in models]
    assert llama.get("/props").json()["default_generation_settings"]["n_ctx"] == 2048
    r = llama.post("/completion", json=sillytavern_body(CHATML_PROMPT, stream=False))
    assert r.status_code == 200, r.text
    body = r.json()
    assert RESULT_FIELDS | {"completion_probabilities"} <= set(body) and body["content"].strip()
    assert TIMINGS <= set(body["timings"]) and SETTINGS <= set(body["generation_settings"])
    frames = stream_frames(llama, sillytavern_body(CHATML_PROMPT, stream=True))
    assert all(FRAME_FIELDS <= set(f) and not f["stop"] and f["completion_probabilities"] for f in frames[:-1])
    assert RESULT_FIELDS <= set(frames[-1]) and frames[-1]["stop"] is True
    assert "".join(f["content"] for f in frames).strip()


def test_multi_swipe_is_a_list_sillytavern_reads(llama: httpx.Client) -> None:
    body = {**sillytavern_body(CHATML_PROMPT, stream=False), "n": 2, "n_probs": 0, "logprobs": 0}
    data = llama.post("/completion", json=body).json()
    assert isinstance(data, list) and [d["index"] for d in data] == [0, 1]
    assert all(d["content"].strip() for d in data)  # data[0].content, then swipes from data[1:]
    frames = stream_frames(llama, {**body, "stream": True})
    assert {f["index"] for f in frames} == {0, 1} and sum(f["stop"] for f in frames) == 2


def test_greedy_stream_matches_the_whole_answer(llama: httpx.Client) -> None:
    request = {"prompt": "Once upon a time", "n_predict": 20, "temperature": 0, "cache_prompt": True}
    whole = llama.post("/completion", json=request).json()
    frames = stream_frames(llama, {**request, "stream": True})
    assert "".join(f["content"] for f in frames[:-1]) == whole["content"]
    assert (frames[-1]["stop_type"], frames[-1]["tokens_predicted"]) == (whole["stop_type"], whole["tokens_predicted"])


def test_errors_in_llama_servers_shape(llama: httpx.Client, live_server: LiveServer) -> None:
    r = llama.post("/completion", json={"prompt": "Hi", "n_predict": "abc"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["type"], error["param"]) == (400, "invalid_request_error", "n_predict")
    assert "n_predict" in error["message"]
    r = httpx.post(live_server.base_url + "/completion", json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401


def test_slots(llama: httpx.Client, live_server: LiveServer) -> None:
    assert httpx.get(live_server.base_url + "/slots", timeout=30).status_code == 401
    slots = llama.get("/slots").json()
    assert slots and all(s["n_ctx"] == 2048 and s["is_processing"] is False for s in slots)
    assert all({"id", "id_task", "speculative", "params", "next_token"} <= set(s) for s in slots)
    assert llama.get("/slots", params={"model": MODEL_NAME}).json() == slots
