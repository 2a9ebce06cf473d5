"""The real `ollama` Python client against a live Parley server."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from tests.conftest import MODEL_NAME, LiveServer

NAME = f"{MODEL_NAME}:latest"
OPTIONS = {"temperature": 0, "num_predict": 32}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> ollama.Client:
    return ollama.Client(host=live_server.base_url, headers={"Authorization": f"Bearer {live_server.keys.api}"})


def test_chat(client: ollama.Client) -> None:
    response = client.chat(model=NAME, messages=QUESTION, options=OPTIONS)
    assert response.message.role == "assistant"
    assert "Paris" in (response.message.content or "")
    assert response.done and response.done_reason in ("stop", "length")
    assert (response.eval_count or 0) > 0 and (response.prompt_eval_count or 0) > 5
    assert (response.total_duration or 0) > 0 and (response.eval_duration or 0) > 0


def test_chat_stream(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL_NAME, messages=QUESTION, options=OPTIONS, stream=True))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content or "" for p in parts)
    assert text == client.chat(model=NAME, messages=QUESTION, options=OPTIONS).message.content


def test_generate(client: ollama.Client) -> None:
    response = client.generate(model=NAME, prompt="Name three colors.", options=OPTIONS)
    assert response.response and response.done
    parts = list(client.generate(model=NAME, prompt="Name three colors.", options=OPTIONS, stream=True))
    assert "".join(p.response or "" for p in parts) == response.response
    limited = client.generate(model=NAME, prompt="Write a long story.", options={"num_predict": 3, "temperature": 0})
    assert limited.done_reason == "length" and limited.eval_count == 3


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_format_schema_and_json(client: ollama.Client) -> None:
    for seed in range(3):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 80}
        chat = client.chat(model=NAME, format=PERSON, options=options,
                           messages=[{"role": "user", "content": "Describe a person."}])
        assert chat.done_reason == "stop"
        jsonschema.validate(json.loads(chat.message.content or ""), PERSON)
        generated = client.generate(model=NAME, prompt="A person as JSON.", format=PERSON, options=options)
        jsonschema.validate(json.loads(generated.response), PERSON)
    response = client.chat(model=NAME, format="json", options={"temperature": 0, "num_predict": 60},
                           messages=[{"role": "user", "content": "Describe a cat as JSON with a name field."}])
    if response.done_reason == "stop":  # any object is allowed, so only a finished one must parse
        assert isinstance(json.loads(response.message.content or ""), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_round_trip(client: ollama.Client) -> None:
    """A request with tools parses in the client whether or not the tiny model calls one; the call and
    its result go back in Ollama's own shape (arguments as an object)."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat(model=NAME, messages=ask, tools=[WEATHER], options={"temperature": 0, "num_predict": 40})
    assert first.done and first.message.role == "assistant"
    for call in first.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    streamed = list(client.chat(model=NAME, messages=ask, tools=[WEATHER], stream=True,
                                options={"temperature": 0, "num_predict": 40}))
    assert streamed[-1].done
    history = [*ask,
               {"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 24 degrees Celsius."}]
    answer = client.chat(model=NAME, messages=history, tools=[WEATHER], options=OPTIONS)
    assert answer.done and (answer.message.content or answer.message.tool_calls)  # it may well call again
    for call in answer.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_think_and_forced_preset(client: ollama.Client, live_server: LiveServer) -> None:
    # Warm the prompt's cache first: a reused prefix computed in another batch shape can flip a
    # borderline token by float rounding, so compared runs must start from the same cache state.
    client.chat(model=NAME, messages=QUESTION, options=OPTIONS)
    plain = client.chat(model=NAME, messages=QUESTION, options=OPTIONS)
    thought = client.chat(model=NAME, messages=QUESTION, options=OPTIONS, think=True)
    assert thought.message.content == plain.message.content and not thought.message.thinking
    admin = {"X-Admin-Key": live_server.keys.admin}
    options = {"temperature": 1.5, "seed": 5, "num_predict": 16}
    client.generate(model=NAME, prompt="Tell me a story.", options={**options, "temperature": 0})  # warm the cache
    try:
        r = httpx.post(live_server.base_url + "/v1/sampling/override/switch", headers=admin,
                       json={"overrides": {"temperature": {"override": 0.0, "force": True}}})
        assert r.status_code == 200, r.text
        forced = client.generate(model=NAME, prompt="Tell me a story.", options=options).response
    finally:
        httpx.post(live_server.base_url + "/v1/sampling/override/unload", headers=admin)
    greedy = client.generate(model=NAME, prompt="Tell me a story.", options={**options, "temperature": 0})
    assert forced == greedy.response


def test_list_show_ps(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == [NAME]
    assert models[0].details is not None and models[0].details.quantization_level == "Q4_1"
    assert models[0].size and models[0].modified_at is not None
    shown = client.show(NAME)
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.template and "completion" in (shown.capabilities or [])
    running = client.ps().models
    assert [m.model for m in running] == [NAME]
    assert running[0].context_length == 2048 and running[0].expires_at is not None


def test_version_and_root(live_server: LiveServer) -> None:
    # The ollama client has no version() call; clients read it with plain HTTP.
    headers = {"Authorization": f"Bearer {live_server.keys.api}"}
    assert httpx.get(live_server.base_url + "/api/version", headers=headers).json()["version"]
    assert httpx.get(live_server.base_url + "/").text == "Ollama is running"


def test_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=QUESTION)
    assert info.value.status_code == 404 and "not found" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model=NAME, input="hello")
    assert info.value.status_code == 400 and "embeddings" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.delete(NAME)
    assert info.value.status_code == 501
