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
