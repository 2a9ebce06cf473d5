"""Wire framing of each dialect, on the real app over a scripted FakeEngine (no llama.cpp).

The app is `endpoints.app.create_app` as served; only the engine is fake
(tests/fake_engine.py), slipped in where the model manager loads engines.
What is checked is the framing: OpenAI SSE ending with `[DONE]` and its usage
chunk, Ollama NDJSON ending with `done: true` and durations, Kobold's
`event: message` frames without `[DONE]`, an engine failure mid-stream as each
dialect's error frame, and an unloaded model as a 503 in each dialect's shape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import Finished, FinishReason, GenerationHandle, GenerationRequest, TextDelta
from backends.sampling import SamplingParams
from tests.fake_engine import HANG, UNLOADED, FakeEngine, FakeServer, Pause, fail, fake_app

ANSWER = ["Hello", " world", ", how", " are", " you?"]
ANSWER_TEXT = "".join(ANSWER)
HALF = ["Half an", " answer"]
FAILURE = "scripted engine failure: the GPU caught fire"


def scripted() -> FakeEngine:
    return FakeEngine(
        default=ANSWER,
        scripts={
            "please fail": [*HALF, fail(FAILURE)],
            "please unload": ["Some", " text", UNLOADED],
            "please hang": ["Waiting", HANG],
        },
    )


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    with fake_app(tmp_path, monkeypatch, scripted) as s:
        yield s


def sse_events(body: str) -> list[dict[str, str]]:
    """Split an SSE body into events ({"event": ..., "data": ...}); every frame must end with a blank line."""
    assert body.endswith("\n\n"), f"the stream does not end with a whole frame: {body[-80:]!r}"
    events = []
    for block in body.split("\n\n")[:-1]:
        event: dict[str, str] = {}
        for line in block.split("\n"):
            key, sep, value = line.partition(": ")
            assert sep, f"not an SSE field line: {line!r} in {block!r}"
            event[key] = event[key] + "\n" + value if key in event else value
        events.append(event)
    return events


def ndjson_lines(body: str) -> list[dict[str, Any]]:
    assert body.endswith("\n"), f"NDJSON must end each line with a newline: {body[-80:]!r}"
    return [json.loads(line) for line in body.split("\n")[:-1]]


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


# -- OpenAI ---------------------------------------------------------------------------------
def test_openai_chat_stream_frames_end_with_done(server: FakeServer) -> None:
    r = server.client.post("/v1/chat/completions", json=chat("hi", stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(set(e) == {"data"} for e in events), "OpenAI frames are data-only"
    assert events[-1]["data"] == "[DONE]"
    assert [e["data"] for e in events].count("[DONE]") == 1
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in chunks), "no usage key unless stream_options.include_usage"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ANSWER_TEXT
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_openai_include_usage_adds_a_usage_chunk_before_done(server: FakeServer) -> None:
    body = chat("hi", stream=True, stream_options={"include_usage": True})
    r = server.client.post("/v1/chat/completions", json=body)
    events = sse_events(r.text)
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    *content, last = chunks
    assert all(c["usage"] is None for c in content), "every other chunk carries usage: null"
    assert last["choices"] == []
    request = server.engine.requests[-1]
    completion = len(server.engine.tokenize(ANSWER_TEXT, add_bos=False, special=False))
    assert last["usage"]["prompt_tokens"] == len(request.prompt_tokens)
    assert last["usage"]["completion_tokens"] == completion
    assert last["usage"]["total_tokens"] == len(request.prompt_tokens) + completion


def test_openai_max_tokens_and_stop_strings_reach_the_engine(server: FakeServer) -> None:
    r = server.client.post("/v1/chat/completions", json=chat("hi", stream=True, max_tokens=2))
    chunks = [json.loads(e["data"]) for e in sse_events(r.text)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    r = server.client.post("/v1/chat/completions", json=chat("hi", stop=[", how"]))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Hello world"
    assert choice["finish_reason"] == "stop"
    assert ", how" in server.engine.requests[-1].params.stop


def test_openai_text_completion_stream_ends_with_done(server: FakeServer) -> None:
    r = server.client.post("/v1/completions", json={"model": "fake", "prompt": "Once", "stream": True})
    events = sse_events(r.text)
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ANSWER_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_engine_error_mid_stream_is_an_error_frame(server: FakeServer) -> None:
    r = server.client.post("/v1/chat/completions", json=chat("please fail", stream=True))
    assert r.status_code == 200  # the headers went out before the failure
    events = sse_events(r.text)
    assert events[-1]["data"] == "[DONE]"
    error = json.loads(events[-2]["data"])
    assert error["error"]["code"] == "engine_error"
    assert FAILURE in error["error"]["message"]
    chunks = [json.loads(e["data"]) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(HALF)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks), "a failed choice has no finish_reason"


def test_openai_unload_mid_generation_is_a_503(server: FakeServer) -> None:
    r = server.client.post("/v1/chat/completions", json=chat("please unload"))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_not_loaded"


# -- Ollama ---------------------------------------------------------------------------------
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


@pytest.mark.parametrize("route, field", [("/api/chat", "message"), ("/api/generate", "response")])
def test_ollama_ndjson_ends_with_done_and_durations(server: FakeServer, route: str, field: str) -> None:
    body: dict[str, Any] = {"model": "fake"}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if route == "/api/chat" else {"prompt": "hi"}
    r = server.client.post(route, json=body)  # Ollama streams by default
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson_lines(r.text)
    *parts, last = lines
    assert parts and all(p["done"] is False for p in parts)
    assert last["done"] is True and last["done_reason"] == "stop"
    text = "".join(p["message"]["content"] if field == "message" else p["response"] for p in parts)
    assert text == ANSWER_TEXT
    for key in DURATIONS:
        assert isinstance(last[key], int) and last[key] >= 0, (key, last[key])
    assert last["eval_duration"] > 0 and last["prompt_eval_duration"] > 0
    assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"]
    assert last["prompt_eval_count"] == len(server.engine.requests[-1].prompt_tokens)
    assert last["eval_count"] == len(server.engine.tokenize(ANSWER_TEXT, add_bos=False, special=False))
    assert all(line["model"].startswith("fake") and line["created_at"].endswith("Z") for line in lines)


def test_ollama_engine_error_mid_stream_is_an_error_line(server: FakeServer) -> None:
    r = server.client.post("/api/chat", json=chat("please fail"))
    lines = ndjson_lines(r.text)
    *parts, last = lines
    assert last == {"error": last["error"]} and FAILURE in last["error"]
    assert all(p["done"] is False for p in parts), "no done:true after a failure"
    assert "".join(p["message"]["content"] for p in parts) == "".join(HALF)


def test_ollama_unload_mid_generation_is_a_503(server: FakeServer) -> None:
    r = server.client.post("/api/chat", json=chat("please unload", stream=False))
    assert r.status_code == 503, r.text
    assert set(r.json()) == {"error"}


# -- KoboldAI -------------------------------------------------------------------------------
def test_kobold_stream_is_message_events_without_done(server: FakeServer) -> None:
    r = server.client.post("/api/extra/generate/stream", json={"prompt": "hi", "max_length": 50})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = sse_events(r.text)
    assert {e["event"] for e in events} == {"message"}
    frames = [json.loads(e["data"]) for e in events]
    assert all(set(f) == {"token", "finish_reason"} for f in frames)
    assert "".join(f["token"] for f in frames) == ANSWER_TEXT
    assert frames[-1]["finish_reason"] == "stop"
    assert {f["finish_reason"] for f in frames[:-1]} == {None}


def test_kobold_stream_is_declared_as_event_stream_in_openapi(server: FakeServer) -> None:
    """The schema says what the wire carries: SSE, not the JSON FastAPI declares by default."""
    schema = server.client.get("/openapi.json").json()
    ok = schema["paths"]["/api/extra/generate/stream"]["post"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"], ok
    r = server.client.post("/api/extra/generate/stream", json={"prompt": "hi", "max_length": 5})
    assert r.headers["content-type"].split(";")[0] in ok["content"]
    client_error = schema["paths"]["/api/extra/generate/stream"]["post"]["responses"]["4XX"]
    assert list(client_error["content"]) == ["application/json"], client_error  # errors stay JSON
    r = server.client.post("/api/extra/generate/stream", json={"prompt": "hi", "n": 2})
    assert r.status_code == 400 and r.headers["content-type"].split(";")[0] in client_error["content"]


def test_kobold_max_length_ends_with_length(server: FakeServer) -> None:
    r = server.client.post("/api/extra/generate/stream", json={"prompt": "hi", "max_length": 2})
    frames = [json.loads(e["data"]) for e in sse_events(r.text)]
    assert "".join(f["token"] for f in frames) == "Hello world"
    assert frames[-1]["finish_reason"] == "length"


def test_kobold_engine_error_mid_stream_is_an_error_event(server: FakeServer) -> None:
    r = server.client.post("/api/extra/generate/stream", json={"prompt": "please fail", "max_length": 50})
    assert "[DONE]" not in r.text
    events = sse_events(r.text)
    assert events[-1]["event"] == "error"
    detail = json.loads(events[-1]["data"])["detail"]
    assert detail["type"] == "engine_error" and FAILURE in detail["msg"]
    assert {e["event"] for e in events[:-1]} == {"message"}
    assert "".join(json.loads(e["data"])["token"] for e in events[:-1]) == "".join(HALF)


def test_kobold_unload_mid_generation_is_a_503(server: FakeServer) -> None:
    r = server.client.post("/api/v1/generate", json={"prompt": "please unload", "max_length": 50})
    assert r.status_code == 503, r.text
    assert r.json()["detail"]["type"] == "model_not_loaded"


# -- a model that is not loaded: 503 with Retry-After in every dialect --------------------------------
UNLOAD_ROUTES = [
    ("/v1/chat/completions", chat("please unload")),
    ("/v1/messages", {"model": "fake", "max_tokens": 20, "messages": [{"role": "user", "content": "please unload"}]}),
    ("/api/chat", chat("please unload", stream=False)),
    ("/api/v1/generate", {"prompt": "please unload", "max_length": 50}),
]


@pytest.mark.parametrize(("path", "body"), UNLOAD_ROUTES, ids=[p for p, _ in UNLOAD_ROUTES])
def test_unloaded_model_503_says_when_to_retry(server: FakeServer, path: str, body: dict[str, Any]) -> None:
    r = server.client.post(path, json=body)
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1, "a 503 for a model that is not loaded must say when to retry"


def test_loading_model_503_says_when_to_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that cannot wait for the start-up load get a 503 with Retry-After, in their dialect's shape."""
    from fastapi.testclient import TestClient

    from endpoints.app import create_app
    from tests.conftest import make_config
    from tests.fake_engine import install_fake_loader

    gate = threading.Event()

    def held() -> FakeEngine:
        assert gate.wait(30), "the test never let the load finish"
        return scripted()

    install_fake_loader(monkeypatch, held)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "fake.gguf").write_bytes(b"")
    config = make_config(tmp_path, model_dir, network={"disable_auth": True}, model={"model_name": "fake"})
    with TestClient(create_app(config)) as client:
        try:
            answers = {
                "openai": client.get("/v1/model"),
                "anthropic": client.post("/v1/messages", json={"model": "x", "max_tokens": 5,
                                                               "messages": [{"role": "user", "content": "hi"}]}),
                "kobold": client.post("/api/v1/generate", json={"prompt": "hi"}),
            }
        finally:
            gate.set()
    for dialect, r in answers.items():
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (dialect, r.headers, r.text)
    assert answers["openai"].json()["error"]["code"] == "model_not_loaded"
    assert answers["anthropic"].json()["error"]["type"] == "overloaded_error"
    assert answers["kobold"].json()["detail"]["type"] == "model_not_loaded"


# -- a real unload through the manager --------------------------------------------------------
def test_admin_unload_ends_a_running_request_with_503(server: FakeServer) -> None:
    """Not a scripted UNLOAD: the manager closes the engine under a running request."""
    engine = server.engine
    answer: dict[str, Any] = {}

    def run() -> None:
        answer["response"] = server.client.post("/v1/chat/completions", json=chat("please hang"))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not engine.stats().slots_active:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
    r = server.client.post("/v1/model/unload", json={"model_name": "fake"})
    assert r.status_code == 200, r.text
    worker.join(10)
    assert not worker.is_alive(), "the running request did not end when its model was unloaded"
    assert engine.closed
    assert answer["response"].status_code == 503, answer["response"].text
    assert answer["response"].json()["error"]["code"] == "model_not_loaded"


# -- the fake itself ------------------------------------------------------------------------
def request(engine: FakeEngine, prompt: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(engine.tokenize(prompt, add_bos=False, special=True), SamplingParams(**params))


async def run_events(engine: FakeEngine, req: GenerationRequest) -> tuple[str, Finished]:
    return await run_events_of(engine.submit(req))


def test_fake_vocabulary_round_trips() -> None:
    engine = FakeEngine()
    text = "<|im_start|>user\nHello world, ¿qué tal? 🙂<|im_end|>\n"
    ids = engine.tokenize(text, add_bos=True, special=True)
    assert ids[0] == engine.info.bos_token_id and ids[1] == 2  # <|im_start|> is one token
    assert engine.detokenize(ids, special=True) == "<s>" + text
    assert engine.detokenize(ids) == "user\nHello world, ¿qué tal? 🙂\n"
    assert len(engine.tokenize("Hello world", add_bos=False, special=False)) == 2
    assert engine.tokenize("<s>", add_bos=False, special=False) == [4 + ord(c) for c in "<s>"]
    assert all(0 <= t < engine.info.n_vocab for t in ids)


async def test_fake_scripts_limits_and_stops() -> None:
    engine = FakeEngine(default=["Hello", " world", "!"], scripts={"boom": ["Oops", fail("bad")]})
    text, finish = await run_events(engine, request(engine, "anything"))
    assert (text, finish.reason, finish.usage.completion_tokens) == ("Hello world!", FinishReason.STOP, 3)
    text, finish = await run_events(engine, request(engine, "anything", max_tokens=2))
    assert (text, finish.reason) == ("Hello world", FinishReason.LENGTH)
    text, finish = await run_events(engine, request(engine, "anything", stop=("o w",)))
    assert (text, finish.reason, finish.stop_string) == ("Hell", FinishReason.STOP, "o w")
    text, finish = await run_events(engine, request(engine, "a boom b"))
    assert (text, finish.reason, finish.error) == ("Oops", FinishReason.ERROR, "bad")
    assert engine.stats().slots_active == 0 and engine.stats().requests_finished == 4


async def test_fake_close_unloads_and_cancel_cancels() -> None:
    engine = FakeEngine(default=["Hi", Pause(0.01), HANG])
    hanging = engine.submit(request(engine, "x"))
    events = hanging.events()
    assert isinstance(await anext(events), TextDelta)
    cancelled = engine.submit(request(engine, "y"))
    cancelled.cancel()
    assert engine.stats().slots_active == 1
    await engine.close()
    last = await anext(events)
    assert isinstance(last, Finished) and last.reason is FinishReason.UNLOAD
    _, finish = await run_events_of(cancelled)
    assert finish.reason is FinishReason.CANCELLED
    with pytest.raises(Exception, match="unloaded"):
        engine.submit(request(engine, "z"))
    assert engine.stats().slots_active == 0


async def run_events_of(handle: GenerationHandle) -> tuple[str, Finished]:
    text, finish = "", None
    async for ev in handle.events():
        if isinstance(ev, TextDelta):
            assert finish is None, "events after Finished"
            text += ev.text
        else:
            finish = ev
    assert finish is not None
    return text, finish
