"""Responses and Assistants stream framing over a scripted engine: typed events in order with sequence
numbers, reasoning items, and a failure mid-stream as `error` + `response.failed` (Responses) or
`thread.run.failed` (runs), never `[DONE]` for Responses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_engine import FakeEngine, FakeServer, fail, fake_app
from tests.unit.test_dialect_framing import sse_events


def scripted() -> FakeEngine:
    return FakeEngine(default=["Hello", " world"], scripts={
        "please fail": ["Half an", " answer", fail("the GPU caught fire")],
        "please think": ["<think>", "Let me see", "</think>", "Paris"],
    })


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    with fake_app(tmp_path, monkeypatch, scripted) as s:
        yield s


def _typed(body: str) -> list[dict]:
    events = sse_events(body)
    assert all(set(e) == {"event", "data"} for e in events), "every Responses frame names its event"
    out = [json.loads(e["data"]) for e in events]
    assert [d["type"] for d in out] == [e["event"] for e in events]
    assert [d["sequence_number"] for d in out] == list(range(len(out)))
    return out


def test_response_stream_events(server: FakeServer) -> None:
    r = server.client.post("/v1/responses", json={"model": "fake", "input": "hi", "stream": True})
    events = _typed(r.text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello world"
    assert "[DONE]" not in r.text


def test_response_failure_mid_stream(server: FakeServer) -> None:
    r = server.client.post("/v1/responses", json={"model": "fake", "input": "please fail", "stream": True})
    events = _typed(r.text)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert "GPU caught fire" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "GPU caught fire" in failed["error"]["message"]
    assert server.client.get(f"/v1/responses/{failed['id']}").status_code == 404  # a failed response is not stored
    whole = server.client.post("/v1/responses", json={"model": "fake", "input": "please fail"})
    assert whole.status_code == 500 and "GPU caught fire" in whole.json()["error"]["message"]


def test_reasoning_becomes_a_reasoning_item(server: FakeServer) -> None:
    r = server.client.post("/v1/responses", json={"model": "fake", "input": "please think"})
    output = r.json()["output"]
    assert [o["type"] for o in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Let me see"}]
    assert output[1]["content"][0]["text"] == "Paris"
    kinds = [e["type"] for e in _typed(server.client.post(
        "/v1/responses", json={"model": "fake", "input": "please think", "stream": True}).text)]
    assert "response.reasoning_text.delta" in kinds and kinds.index("response.reasoning_text.done") < kinds.index(
        "response.output_text.delta")


def test_run_failure_mid_stream(server: FakeServer) -> None:
    c = server.client
    assistant = c.post("/v1/assistants", json={"model": "fake"}).json()
    thread = c.post("/v1/threads", json={"messages": [{"role": "user", "content": "please fail"}]}).json()
    r = c.post(f"/v1/threads/{thread['id']}/runs", json={"assistant_id": assistant["id"], "stream": True})
    events = sse_events(r.text)
    assert [e["event"] for e in events][-2:] == ["thread.run.failed", "done"] and events[-1]["data"] == "[DONE]"
    run = json.loads(events[-2]["data"])
    assert run["status"] == "failed" and "GPU caught fire" in run["last_error"]["message"]
    # The failed run let the thread go.
    again = c.post(f"/v1/threads/{thread['id']}/runs", json={"assistant_id": assistant["id"], "stream": True})
    assert again.status_code == 200
