"""The official anthropic SDK against Parley on a real socket, with the real default model.

The SDK appends /v1/messages to its base URL, so it is given the server root.
Its methods take no sampling arguments, so samplers travel in `extra_body`.
The server runs with `inline_model_loading: true`, so a model name that is not
in the model directory is a 404 (a server with one model and inline loading
off answers every name with that model, as Claude-named clients need).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import MODEL_NAME, LiveServer, run_server

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
}
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("anthropic")
    (tmp / "config.yml").write_text("model:\n  inline_model_loading: true\n")
    with run_server(model_dir, MODEL_NAME, tmp) as live:
        yield live


@pytest.fixture(scope="module")
def sdk(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=server.keys.api, max_retries=0)


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create(sdk: anthropic.Anthropic) -> None:
    m = sdk.messages.create(model=MODEL_NAME, max_tokens=30, messages=CAPITAL, extra_body=GREEDY,
                            metadata={"user_id": "tester"})
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert "Paris" in text_of(m)
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 30


def test_count_tokens_matches_the_prompt_a_message_reads(sdk: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are terse."}]
    counted = sdk.messages.count_tokens(model=MODEL_NAME, system=system, messages=CAPITAL, tools=[WEATHER])
    m = sdk.messages.create(model=MODEL_NAME, max_tokens=1, system=system, messages=CAPITAL, tools=[WEATHER],
                            extra_body=GREEDY)
    assert counted.input_tokens == m.usage.input_tokens
    bare = sdk.messages.count_tokens(model=MODEL_NAME, messages=CAPITAL)
    assert 0 < bare.input_tokens < counted.input_tokens


def test_stream_events_and_final_message(sdk: anthropic.Anthropic) -> None:
    kinds: list[str] = []
    pieces: list[str] = []
    with sdk.messages.stream(model=MODEL_NAME, max_tokens=20, messages=[
        {"role": "user", "content": "Name three colors."}
    ], extra_body=GREEDY) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert "".join(pieces) == text_of(final) and text_of(final).strip()
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 20


def test_stop_sequence(sdk: anthropic.Anthropic) -> None:
    # The same request alone twice reads the same tokens (cold, then from the prompt cache): cut the
    # second answer at a word the first one wrote.
    ask = {"model": MODEL_NAME, "max_tokens": 24, "messages": CAPITAL, "extra_body": GREEDY}
    first = text_of(sdk.messages.create(**ask))
    words = first.split()
    assert len(words) >= 3, first
    cut = " " + words[2]
    m = sdk.messages.create(**ask, stop_sequences=[cut])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", cut)
    assert text_of(m) == first[: first.index(cut)]


def test_sampling_through_extra_body(sdk: anthropic.Anthropic) -> None:
    sampling = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 7}
    ask = {"model": MODEL_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Tell me a story."}]}
    first = sdk.messages.create(**ask, extra_body=sampling)
    again = sdk.messages.create(**ask, extra_body=sampling)
    assert text_of(first) == text_of(again), "one seed, one story"
    with pytest.raises(anthropic.BadRequestError) as exc:
        sdk.messages.create(**ask, extra_body={"top_p": 2})
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert "top_p" in exc.value.body["error"]["message"]


def test_tool_round_trip(sdk: anthropic.Anthropic) -> None:
    """A forced call, streamed (the SDK assembles `input` from input_json_delta), then its result."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "tool", "name": "get_weather"}
    with sdk.messages.stream(model=MODEL_NAME, max_tokens=40, messages=messages, tools=[WEATHER],
                             tool_choice=forced, extra_body=GREEDY) as stream:
        json_parts = [e.delta.partial_json for e in stream
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        m = stream.get_final_message()
    assert m.stop_reason == "tool_use", m
    calls = [b for b in m.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("toolu_")
    assert calls[0].input == json.loads("".join(json_parts)) and isinstance(calls[0].input["city"], str)
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "18 C, sunny"}]},
    ]
    answer = sdk.messages.create(model=MODEL_NAME, max_tokens=20, messages=messages, tools=[WEATHER],
                                 tool_choice={"type": "none"}, extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert text_of(answer).strip() and not [b for b in answer.content if b.type == "tool_use"]


def test_bad_input_is_anthropic_errors_naming_the_field(sdk: anthropic.Anthropic, server: LiveServer) -> None:
    def refused(body: dict[str, Any]) -> anthropic.APIStatusError:
        with pytest.raises(anthropic.APIStatusError) as exc:
            sdk.post("/v1/messages", cast_to=object, body=body)
        return exc.value

    missing = refused({"model": MODEL_NAME, "messages": CAPITAL})
    assert isinstance(missing, anthropic.BadRequestError)
    assert missing.body["type"] == "error" and missing.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.body["error"]["message"]

    with pytest.raises(anthropic.BadRequestError) as role:
        sdk.messages.create(model=MODEL_NAME, max_tokens=5, messages=[{"role": "system", "content": "hi"}])
    assert "messages[0].role" in role.value.body["error"]["message"]

    with pytest.raises(anthropic.NotFoundError) as unknown:
        sdk.messages.create(model="claude-no-such-model", max_tokens=5, messages=CAPITAL)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    assert "claude-no-such-model" in unknown.value.body["error"]["message"]

    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=MODEL_NAME, max_tokens=5, messages=CAPITAL)
    assert auth.value.body["error"]["type"] == "authentication_error"

    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=server.keys.api, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL_NAME, messages=CAPITAL).input_tokens > 0


def test_a_fault_mid_stream_is_an_error_event(sdk: anthropic.Anthropic, server: LiveServer) -> None:
    """Unloading the model under a running stream ends it with `event: error`, which the SDK raises."""
    admin = {"X-Admin-Key": server.keys.admin}
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as exc:
        with sdk.messages.stream(model=MODEL_NAME, max_tokens=200, messages=[
            {"role": "user", "content": "Write a long story about a dragon."}
        ], extra_body={"ignore_eos": True}) as stream:
            for event in stream:
                seen.append(event.type)
                if event.type == "content_block_delta" and seen.count("content_block_delta") == 1:
                    r = httpx.post(server.base_url + "/v1/model/unload", headers=admin, json={}, timeout=60)
                    assert r.status_code == 200, r.text
    assert "message_start" in seen and "message_stop" not in seen
    assert exc.value.body["type"] == "error" and exc.value.body["error"]["type"] == "overloaded_error"
    assert "unloaded" in exc.value.body["error"]["message"]
    with httpx.stream("POST", server.base_url + "/v1/model/load", headers=admin, json={"model_name": MODEL_NAME},
                      timeout=120) as r:
        assert r.status_code == 200 and r.read()
    assert sdk.messages.count_tokens(model=MODEL_NAME, messages=CAPITAL).input_tokens > 0
