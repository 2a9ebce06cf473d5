"""LangChain's ChatOpenAI (langchain-openai 1.x) against Parley on a real socket.

LangChain sends pydantic-made schemas without `additionalProperties`; forced
tool calls and structured output must still end with exactly the named
fields. Assertions are on parsed types and keys, never on the model's words.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.conftest import MODEL_NAME, LiveServer

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"Sunny in {city}"


class Capital(BaseModel):
    """The capital city of a country."""

    country: str = Field(description="the country")
    city: str = Field(description="its capital city")


@pytest.fixture(scope="module")
def chat(live_server: LiveServer) -> langchain_openai.ChatOpenAI:
    return langchain_openai.ChatOpenAI(
        base_url=live_server.base_url + "/v1",
        api_key=live_server.keys.api,
        model=MODEL_NAME,
        temperature=0,
        max_tokens=120,
        max_retries=0,
        timeout=120,
    )


def test_bind_tools_with_named_tool_choice_returns_the_call(chat: langchain_openai.ChatOpenAI) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.invalid_tool_calls
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather"
    assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str) and call["args"]["city"]
    assert call["id"]
    assert get_weather.invoke(call["args"]).startswith("Sunny in ")  # the args fit the tool as LangChain runs it


def test_bind_tools_streamed_call_assembles(chat: langchain_openai.ChatOpenAI) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    merged: AIMessageChunk | None = None
    for chunk in bound.stream("What is the weather in Rome?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    assert merged.response_metadata.get("finish_reason") == "tool_calls"
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]
    assert set(merged.tool_calls[0]["args"]) == {"city"}


def test_tool_call_cut_by_max_tokens_reports_length(chat: langchain_openai.ChatOpenAI) -> None:
    # About 18 tokens reach the arguments of `<tool_call>\n{"name": "get_weather", "arguments": {`: cut inside them.
    short = chat.model_copy(update={"max_tokens": 21})
    message = short.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert message.response_metadata["finish_reason"] == "length"
    # The partial call comes back as it was cut; LangChain lists unparsable arguments as an invalid call.
    calls = message.tool_calls + message.invalid_tool_calls
    assert [c["name"] for c in calls] == ["get_weather"], message
    assert message.content == ""


STRUCTURED_PROMPT = [
    SystemMessage(
        "You answer with a JSON object only, with exactly two string keys, \"country\" and \"city\". "
        'Example: {"country": "Italy", "city": "Rome"}'
    ),
    HumanMessage("What is the capital of France? Answer in JSON."),
]


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_with_structured_output_every_method(chat: langchain_openai.ChatOpenAI, method: str) -> None:
    structured = chat.with_structured_output(Capital, method=method, include_raw=True)
    out = structured.invoke(STRUCTURED_PROMPT)
    assert out["parsing_error"] is None, out["raw"]
    parsed = out["parsed"]
    assert isinstance(parsed, Capital), out["raw"]
    assert parsed.country.strip() and parsed.city.strip()
    raw = out["raw"]
    assert raw.response_metadata["finish_reason"] in ("stop", "tool_calls")
    if method == "function_calling":
        assert [c["name"] for c in raw.tool_calls] == ["Capital"]
        assert set(raw.tool_calls[0]["args"]) == {"country", "city"}
