"""The official openai SDK against Parley on a real socket."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL_NAME, LiveServer


@pytest.fixture(scope="module")
def sdk(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.keys.api, max_retries=0)


def test_models_list(sdk: openai.OpenAI) -> None:
    ids = [m.id for m in sdk.models.list()]
    assert ids == [MODEL_NAME]


def test_chat(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text.strip() and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens <= 8


def test_errors_surface_as_sdk_exceptions(sdk: openai.OpenAI, live_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x " * 5000}])
    assert exc.value.code == "context_length_exceeded"
    bad = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                       "required": ["zone"], "additionalProperties": False},
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_parse_and_validate(sdk: openai.OpenAI, choice: object) -> None:
    import json

    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(3):
        r = sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=seed, max_tokens=120,
        )
        msg = r.choices[0].message
        finish = r.choices[0].finish_reason
        assert msg.tool_calls, msg
        # "required" allows parallel calls, and a sampled run may keep calling until max_tokens:
        # then the answer says "length" and its last call is the partial one.
        assert finish == "tool_calls" or (finish == "length" and choice == "required"), (finish, msg)
        complete = msg.tool_calls if finish == "tool_calls" else msg.tool_calls[:-1]
        if isinstance(choice, dict):
            assert len(msg.tool_calls) == 1  # a named choice makes exactly one call
        for call in complete:
            if isinstance(choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert all(call.id.startswith("call_") for call in msg.tool_calls)


def test_forced_tool_call_streams_incrementally(sdk: openai.OpenAI) -> None:
    import json

    stream = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0.7, seed=1,
        max_tokens=120, stream=True,
    )
    name, args, ids, finish, pieces = None, "", set(), None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.id:
                ids.add(tc.id)
            if tc.function and tc.function.name:
                name = tc.function.name
            if tc.function and tc.function.arguments:
                args += tc.function.arguments
                pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and len(ids) == 1 and finish == "tool_calls"
    assert pieces > 1  # arguments arrive in fragments, not one blob
    assert set(json.loads(args)) == {"city", "unit"}


def test_tool_results_round_trip_through_the_template(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
        ],
        tools=[WEATHER], max_tokens=30, temperature=0,
    )
    # The model may answer in text or call the tool again (cut by max_tokens or not): either is an answer.
    msg, finish = r.choices[0].message, r.choices[0].finish_reason
    assert (msg.content or msg.tool_calls) and finish in ("stop", "length", "tool_calls"), r
    assert finish != "tool_calls" or msg.tool_calls


def test_reasoning_content_is_split_out(sdk: openai.OpenAI) -> None:
    grammar = 'start: "<think>" /[a-z ]{3,30}/ "</think>" /[A-Z][a-z ]{2,30}/'
    r = sdk.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Think, then answer: is water wet?"}],
        max_tokens=80, temperature=0.8, seed=2, extra_body={"grammar_string": grammar},
    )
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning and "<think>" not in msg.content and "</think>" not in msg.content
    assert msg.content and msg.content[0].isupper()
    stream = sdk.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Think, then answer: is water wet?"}],
        max_tokens=80, temperature=0.8, seed=2, extra_body={"grammar_string": grammar}, stream=True,
    )
    got_reasoning, got_content = "", ""
    for chunk in stream:
        if chunk.choices:
            got_reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            got_content += chunk.choices[0].delta.content or ""
    # Same seed, but the second request reuses the cached prompt, and float rounding of a
    # different batch shape can change a sampled token: check the split, not equality.
    assert got_reasoning.strip() and "<think>" not in got_content and "</think>" not in got_content
    assert got_content and got_content[0].isupper()


def test_json_schema_response_format(sdk: openai.OpenAI) -> None:
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
              "required": ["city", "population"], "additionalProperties": False}
    r = sdk.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        temperature=1.0, seed=4, max_tokens=100,
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "population"}
