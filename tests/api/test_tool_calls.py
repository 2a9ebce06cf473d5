"""Forced tool calls and JSON schemas through the real model: closed objects, honest truncation.

Schemas here are what pydantic and LangChain send: no `additionalProperties`.
Before Parley closed such schemas, the model added property after property
until `max_tokens`. Assertions are on structure (valid JSON, keys, finish
reasons), never on the model's exact words.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME

CHAT = "/v1/chat/completions"
CITY_SCHEMA = {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": CITY_SCHEMA},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def sse_chunks(response: Any) -> list[dict[str, Any]]:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed(client: TestClient, payload: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat answer folded into the non-streamed shape (one choice), plus the raw output bytes."""
    with client.stream("POST", CHAT, json=payload | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        chunks = sse_chunks(r)
    content, finish, raw = "", None, b""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.get("id") or call["id"]
            call["name"] = tc["function"].get("name") or call["name"]
            call["arguments"] += tc["function"].get("arguments") or ""
        for lp in (choice.get("logprobs") or {}).get("content") or []:
            raw += bytes(lp["bytes"])
        finish = choice["finish_reason"] or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish, "raw": raw}


def plain(client: TestClient, payload: dict[str, Any]) -> dict[str, Any]:
    r = client.post(CHAT, json=payload)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    calls = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in message.get("tool_calls") or []
    ]
    raw = b"".join(bytes(lp["bytes"]) for lp in (choice.get("logprobs") or {}).get("content") or [])
    return {"content": message["content"] or "", "calls": calls, "finish": choice["finish_reason"], "raw": raw}


def _only_city(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city"}, arguments
    assert isinstance(args["city"], str)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_with_open_schema_ends_with_only_named_properties(client: TestClient, stream: bool) -> None:
    payload = {"messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "temperature": 0, "max_tokens": 200}
    out = streamed(client, payload) if stream else plain(client, payload)
    assert out["finish"] == "tool_calls", out
    assert [c["name"] for c in out["calls"]] == ["get_weather"]
    assert out["calls"][0]["id"].startswith("call_")
    _only_city(out["calls"][0]["arguments"])


def test_forced_tool_call_sampled_ends_too(client: TestClient) -> None:
    for seed in range(3):
        out = plain(client, {"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                             "parallel_tool_calls": False, "temperature": 0.7, "seed": seed, "max_tokens": 200})
        assert out["finish"] == "tool_calls", out
        assert len(out["calls"]) == 1
        _only_city(out["calls"][0]["arguments"])


def test_tool_schema_that_allows_extra_keys_keeps_them_allowed(client: TestClient) -> None:
    """`additionalProperties: true` is the client's explicit choice: the grammar honours it (valid JSON)."""
    params = CITY_SCHEMA | {"additionalProperties": True}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": params}}
    out = plain(client, {"messages": ASK, "tools": [tool], "tool_choice": NAMED, "temperature": 0, "max_tokens": 60})
    assert [c["name"] for c in out["calls"]] == ["get_weather"]
    if out["finish"] == "tool_calls":
        assert "city" in json.loads(out["calls"][0]["arguments"])


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}
DESCRIBE = [{"role": "user", "content": "Describe a person called Ann, aged 30, as JSON."}]


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}},
        {"json_schema": PERSON},
    ],
    ids=["response_format", "json_schema_field"],
)
def test_json_schema_without_additional_properties_gives_only_named_keys(client: TestClient, fields: dict) -> None:
    out = plain(client, {"messages": DESCRIBE, "temperature": 0, "max_tokens": 120, **fields})
    assert out["finish"] == "stop", out
    assert set(json.loads(out["content"])) == {"name", "age"}


def test_ollama_format_schema_gives_only_named_keys(client: TestClient) -> None:
    r = client.post("/api/chat", json={"model": MODEL_NAME, "messages": DESCRIBE, "format": PERSON, "stream": False,
                                       "options": {"temperature": 0, "num_predict": 120}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["done_reason"] == "stop"
    assert set(json.loads(body["message"]["content"])) == {"name", "age"}


def test_json_object_mode_still_allows_any_keys(client: TestClient) -> None:
    out = plain(client, {"messages": DESCRIBE, "temperature": 0, "max_tokens": 80,
                         "response_format": {"type": "json_object"}})
    if out["finish"] == "stop":
        assert isinstance(json.loads(out["content"]), dict)
    else:
        assert out["content"].startswith("{")


def _prefix_tokens(client: TestClient) -> int:
    """Tokens in the call's text up to its arguments, as the model's tokenizer spells it."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"'
    r = client.post("/tokenize", json={"content": text, "add_special": False})
    assert r.status_code == 200, r.text
    return len(r.json()["tokens"])


def test_tool_call_cut_by_max_tokens_is_length_in_both_modes(client: TestClient) -> None:
    """max_tokens inside the call: finish_reason "length", the same partial call streamed or not."""
    start = _prefix_tokens(client)
    partial_seen = 0
    for max_tokens in (2, start - 2, start + 1, start + 3, start + 5):
        payload = {"messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "temperature": 0,
                   "max_tokens": max_tokens, "logprobs": True}
        whole, stream = plain(client, payload), streamed(client, payload)
        for out in (whole, stream):
            assert out["finish"] == "length", (max_tokens, out)
            for call in out["calls"]:
                assert call["name"] == "get_weather" and call["id"].startswith("call_")
                # The partial arguments are exactly what the model wrote last, nothing made up.
                assert out["raw"].decode("utf-8", "replace").endswith(call["arguments"])
            if out["calls"] and out["calls"][0]["arguments"]:
                partial_seen += 1
                with pytest.raises(ValueError):
                    json.loads(out["calls"][0]["arguments"])
        assert len(whole["calls"]) == len(stream["calls"]) <= 1
        if whole["raw"] == stream["raw"]:  # same tokens (a near-tie can differ between runs): same answer
            assert whole["content"] == stream["content"]
            assert [(c["name"], c["arguments"]) for c in whole["calls"]] == [
                (c["name"], c["arguments"]) for c in stream["calls"]
            ]
    assert partial_seen >= 2, "no max_tokens value cut the call inside its arguments"
