"""The Anthropic Messages dialect: request mapping, and wire shapes on the real app over a FakeEngine.

Mapping checks are pure (Anthropic turns -> chat messages, tools, tool_choice,
stop_reason, error bodies). Wire checks serve `endpoints.app.create_app` with
a scripted engine (tests/fake_engine.py): the message object, the SSE event
sequence, stop reasons, tool_use and thinking blocks, errors in Anthropic's
shape naming the field, auth through `x-api-key`, rate limits, and an engine
failure mid-stream as an `event: error` frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import Finished, FinishReason, Usage
from common.errors import APIError, BadRequestError, Dialect, ModelNotLoadedError, RateLimitError
from endpoints.anthropic.mapping import chat_messages, function_tools, openai_tool_choice, system_text
from endpoints.anthropic.protocol import InputMessage, ToolChoice
from endpoints.anthropic.serving import stop_reason
from tests.fake_engine import UNLOADED, FakeEngine, FakeServer, fail, fake_app
from tests.unit.test_dialect_framing import sse_events

FAILURE = "scripted engine failure: the GPU caught fire"
ANSWER = "Hello world, how are you?"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def scripted() -> FakeEngine:
    return FakeEngine(
        default=["Hello", " world", ", how", " are", " you?"],
        scripts={
            "please fail": ["Half an", " answer", fail(FAILURE)],
            "please unload": ["Some", " text", UNLOADED],
            "weather": ["Let me check.", "\n", CALL],
            "ponder": ["<think>", "Hmm", " hmm", "</think>", "Paris."],
        },
    )


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    with fake_app(tmp_path, monkeypatch, scripted) as s:
        yield s


def ask(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "max_tokens": 50, "messages": [{"role": "user", "content": content}], **extra}


def stream_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for e in sse_events(body):
        data = json.loads(e["data"])
        assert data["type"] == e["event"], "each frame's data names its event"
        out.append((e["event"], data))
    return out


def assert_error(r: Any, status: int, kind: str, field: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    if field is not None:
        assert field in body["error"]["message"]
    return body["error"]["message"]


# -- mapping ----------------------------------------------------------------------------
def test_turns_map_onto_chat_messages_with_tool_calls_and_tool_results() -> None:
    messages = [
        InputMessage(role="user", content="Weather in Paris?"),
        InputMessage(role="assistant", content=[
            {"type": "thinking", "thinking": "I should call the tool.", "signature": "x"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]),
        InputMessage(role="user", content=[
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]),
    ]
    out = chat_messages(messages, [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}])
    assert out == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "18C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    failed = chat_messages([messages[1], InputMessage(role="user", content=[
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no such city", "is_error": True}])], None)
    assert failed[-1]["content"] == "Error: no such city"


@pytest.mark.parametrize(("messages", "system", "param"), [
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}], None,
     "messages[0].content[0].tool_use_id"),
    ([{"role": "user", "content": [{"type": "image", "source": {}}]}], None, "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], None, "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"text": "no type"}]}], None, "messages[0].content[0]"),
    ([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}], None,
     "messages[0].content[0].input"),
    ([{"role": "user", "content": "hi"}], [{"type": "image"}], "system[0].type"),
])
def test_bad_blocks_are_400s_naming_the_block(messages: list[dict[str, Any]], system: Any, param: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        chat_messages([InputMessage(**m) for m in messages], system)
    assert exc.value.param == param and param in exc.value.message


def test_tools_and_tool_choice_map_onto_function_tools() -> None:
    tools = function_tools([WEATHER])
    assert tools == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Weather in a city"}}]
    assert openai_tool_choice(None, tools) == ("auto", True)
    assert openai_tool_choice(None, None) == (None, True)
    assert openai_tool_choice(ToolChoice(type="any"), tools) == ("required", True)
    assert openai_tool_choice(ToolChoice(type="none"), tools) == ("none", True)
    named = openai_tool_choice(ToolChoice(type="tool", name="get_weather", disable_parallel_tool_use=True), tools)
    assert named == ({"type": "function", "function": {"name": "get_weather"}}, False)
    for choice, param in ((ToolChoice(type="tool"), "tool_choice.name"), (ToolChoice(type="any"), "tool_choice")):
        with pytest.raises(BadRequestError) as exc:
            openai_tool_choice(choice, tools if param != "tool_choice" else None)
        assert exc.value.param == param
    with pytest.raises(BadRequestError) as exc:
        function_tools([{"type": "web_search_20250305", "name": "web_search"}])
    assert exc.value.param == "tools[0].type"
    assert system_text("") is None


def test_stop_reasons() -> None:
    def fin(reason: FinishReason, stop: str | None = None) -> Finished:
        return Finished(reason, Usage(), stop_string=stop)

    assert stop_reason(fin(FinishReason.STOP), False, ()) == ("end_turn", None)
    assert stop_reason(fin(FinishReason.STOP, "END"), False, ("END",)) == ("stop_sequence", "END")
    assert stop_reason(fin(FinishReason.STOP, "<|im_end|>"), False, ("END",)) == ("end_turn", None)
    assert stop_reason(fin(FinishReason.STOP), True, ()) == ("tool_use", None)
    assert stop_reason(fin(FinishReason.LENGTH), True, ()) == ("max_tokens", None)


@pytest.mark.parametrize(("err", "kind"), [
    (BadRequestError("must be a number.", param="top_k"), "invalid_request_error"),
    (APIError("bad key", status=401), "authentication_error"),
    (APIError("no such model", status=404), "not_found_error"),
    (RateLimitError("slow down"), "rate_limit_error"),
    (ModelNotLoadedError("loading"), "overloaded_error"),
    (APIError("boom"), "api_error"),
])
def test_error_bodies_take_anthropic_types_by_status(err: APIError, kind: str) -> None:
    body = err.body(Dialect.ANTHROPIC)
    assert body["type"] == "error" and body["error"]["type"] == kind
    if err.param:
        assert body["error"]["message"].startswith("top_k: ")


# -- wire ---------------------------------------------------------------------------------
def test_message_object(server: FakeServer) -> None:
    r = server.client.post("/v1/messages", json=ask("hi", system="Be nice.", metadata={"user_id": "u1"}))
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["id"].startswith("msg_") and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == "fake"
    assert msg["content"] == [{"type": "text", "text": ANSWER}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("end_turn", None)
    request = server.engine.requests[-1]
    completion = len(server.engine.tokenize(ANSWER, add_bos=False, special=False))
    assert msg["usage"] == {"input_tokens": len(request.prompt_tokens), "output_tokens": completion}
    assert "Be nice." in server.engine.detokenize(request.prompt_tokens, special=True)
    count = server.client.post("/v1/messages/count_tokens",
                               json={k: v for k, v in ask("hi", system="Be nice.").items() if k != "max_tokens"})
    assert count.status_code == 200 and count.json() == {"input_tokens": len(request.prompt_tokens)}


def test_stream_event_sequence(server: FakeServer) -> None:
    r = server.client.post("/v1/messages", json=ask("hi", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = stream_events(r.text)
    names = [name for name, _ in events]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == len(server.engine.requests[-1].prompt_tokens)
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [d["delta"] for name, d in events if name == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == ANSWER
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(server.engine.tokenize(ANSWER, add_bos=False, special=False))


def test_stop_sequences_and_max_tokens(server: FakeServer) -> None:
    r = server.client.post("/v1/messages", json=ask("hi", stop_sequences=[", how"]))
    msg = r.json()
    assert msg["content"][0]["text"] == "Hello world"
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", ", how")
    events = stream_events(server.client.post("/v1/messages", json=ask("hi", stream=True, max_tokens=2)).text)
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 2


def test_extra_samplers_reach_the_engine(server: FakeServer) -> None:
    body = ask("hi", temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2, seed=3,
               stop_sequences=["END"])
    assert server.client.post("/v1/messages", json=body).status_code == 200
    params = server.engine.requests[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 7, 0.1)
    assert (params.repetition_penalty, params.seed, params.max_tokens) == (1.2, 3, 50)
    assert "END" in params.stop
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = server.client.post("/v1/messages", json=ask("hi", output_config={"format": {"type": "json_schema",
                                                                                    "schema": schema}}))
    assert r.status_code == 200, r.text
    assert server.engine.requests[-1].constraint is not None


def test_tool_use_blocks(server: FakeServer) -> None:
    body = ask("weather in Paris?", tools=[WEATHER], max_tokens=300)
    msg = server.client.post("/v1/messages", json=body).json()
    assert msg["stop_reason"] == "tool_use"
    text, call = msg["content"]
    assert text == {"type": "text", "text": "Let me check."}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"})
    events = stream_events(server.client.post("/v1/messages", json={**body, "stream": True}).text)
    starts = [d["content_block"] for name, d in events if name == "content_block_start"]
    assert [s["type"] for s in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "get_weather" and starts[1]["input"] == {}
    parts = [d["delta"]["partial_json"] for name, d in events
             if name == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert json.loads("".join(parts)) == {"city": "Paris"}
    assert [d["index"] for name, d in events if name == "content_block_stop"] == [0, 1]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # The round trip: the call and its result go back as blocks.
    follow = ask("weather in Paris?", tools=[WEATHER], max_tokens=300)
    follow["messages"] += [
        {"role": "assistant", "content": msg["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "18C"}]},
    ]
    assert server.client.post("/v1/messages", json=follow).status_code == 200
    prompt = server.engine.detokenize(server.engine.requests[-1].prompt_tokens, special=True)
    assert "18C" in prompt and "get_weather" in prompt


def test_thinking_blocks(server: FakeServer) -> None:
    body = ask("ponder this", thinking={"type": "enabled", "budget_tokens": 1024})
    msg = server.client.post("/v1/messages", json=body).json()
    assert msg["content"] == [{"type": "thinking", "thinking": "Hmm hmm", "signature": ""},
                              {"type": "text", "text": "Paris."}]
    events = stream_events(server.client.post("/v1/messages", json={**body, "stream": True}).text)
    deltas = [d["delta"] for name, d in events if name == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == "Hmm hmm"
    assert [d["type"] for d in deltas][0] == "thinking_delta" and deltas[-1]["type"] == "text_delta"
    plain = server.client.post("/v1/messages", json=ask("ponder this")).json()
    assert [b["type"] for b in plain["content"]] == ["text"], "no thinking blocks unless thinking is enabled"


def test_engine_failure_mid_stream_is_an_error_event(server: FakeServer) -> None:
    events = stream_events(server.client.post("/v1/messages", json=ask("please fail", stream=True)).text)
    name, body = events[-1]
    assert name == "error" and body["error"]["type"] == "api_error" and FAILURE in body["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]
    r = server.client.post("/v1/messages", json=ask("please unload"))
    assert_error(r, 503, "overloaded_error")


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    (ask("hi", max_tokens=0), "max_tokens"),
    ({"model": "fake", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    (ask("hi", tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (ask("hi", tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}), "tool_choice"),
    (ask("hi", top_k=True), "top_k"),
    (ask("hi", n=2), "n"),
    (ask([{"type": "image", "source": {"type": "base64", "data": ""}}]), "messages[0].content[0].type"),
    (ask("hi", output_config={"format": {"type": "xml"}}), "output_config.format.type"),
    (ask("hi", output_config={"format": {"type": "json_schema", "schema": 5}}), "output_config.format.schema"),
    (ask("hi", output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
         regex_pattern="[0-9]+"), "json_schema/regex_pattern/grammar_string"),
])
def test_bad_requests_name_the_field(server: FakeServer, body: dict[str, Any], field: str) -> None:
    assert_error(server.client.post("/v1/messages", json=body), 400, "invalid_request_error", field)


def test_unknown_paths_and_bad_json(server: FakeServer) -> None:
    assert_error(server.client.get("/v1/messages/batches"), 404, "not_found_error")
    r = server.client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error")


def test_keys_limits_and_unknown_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_app(tmp_path, monkeypatch, scripted, network={"disable_auth": False},
                  limits={"default_requests_per_minute": 1}, model={"inline_model_loading": True}) as s:
        keys = (tmp_path / "api_tokens.yml").read_text()
        api_key = next(line.split('"')[1] for line in keys.splitlines() if line.startswith("api_key:"))
        assert_error(s.client.post("/v1/messages", json=ask("hi")), 401, "authentication_error", "API key")
        assert_error(s.client.post("/v1/messages", json=ask("hi"), headers={"x-api-key": "wrong"}),
                     401, "authentication_error")
        r = s.client.post("/v1/messages", json=ask("hi"), headers={"x-api-key": api_key})
        assert r.status_code == 200, r.text
        limited = s.client.post("/v1/messages", json=ask("hi"), headers={"Authorization": f"Bearer {api_key}"})
        assert_error(limited, 429, "rate_limit_error")
        assert limited.headers["retry-after"]
        # count_tokens is not a generation: not limited.
        count = s.client.post("/v1/messages/count_tokens", headers={"x-api-key": api_key},
                              json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
        assert count.status_code == 200
        missing = s.client.post("/v1/messages/count_tokens", headers={"x-api-key": api_key},
                                json={"model": "claude-nope", "messages": [{"role": "user", "content": "hi"}]})
        assert_error(missing, 404, "not_found_error", "claude-nope")
