"""The openai SDK's Responses and Conversations clients against Parley on a real socket."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import MODEL_NAME, LiveServer

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def sdk(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.keys.api, max_retries=0)


def test_create_retrieve_chain_and_delete(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(model=MODEL_NAME, input="What is the capital of France? One word.",
                                 instructions="You answer briefly.", max_output_tokens=6, temperature=0)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    assert first.output_text.strip() and first.output[0].type == "message"
    assert first.usage is not None and 0 < first.usage.output_tokens <= 6
    assert sdk.responses.retrieve(first.id).output_text == first.output_text
    items = sdk.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text.startswith("What is")

    second = sdk.responses.create(model=MODEL_NAME, input="Repeat your last answer.", previous_response_id=first.id,
                                  max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id and second.output_text.strip()
    # The second prompt held the first exchange: more input tokens than the new message alone.
    assert second.usage.input_tokens > first.usage.input_tokens

    unstored = sdk.responses.create(model=MODEL_NAME, input="Hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.responses.create(model=MODEL_NAME, input="Hi", previous_response_id=unstored.id, max_output_tokens=4)
    assert exc.value.body["param"] == "previous_response_id"

    assert sdk.responses.delete(second.id) is None or True
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.retrieve(second.id)
    assert missing.value.body["param"] == "response_id"


def test_streamed_events(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model=MODEL_NAME, input="Name three colors.", max_output_tokens=10,
                                       temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          kinds[-1]] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas and deltas == done.output_text
    assert sdk.responses.retrieve(done.id).output_text == deltas


def test_forced_function_tool_and_its_output(sdk: openai.OpenAI) -> None:
    r = sdk.responses.create(model=MODEL_NAME, input="What is the weather in Paris?", tools=[WEATHER],
                             tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
                             temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = sdk.responses.create(
        model=MODEL_NAME, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"celsius": 21}'}],
    )
    assert follow.output_text.strip()

    stream = sdk.responses.create(model=MODEL_NAME, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                                  parallel_tool_calls=False, max_output_tokens=40, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args)["city"]


def test_json_schema_text_format(sdk: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"], "additionalProperties": False}
    r = sdk.responses.create(model=MODEL_NAME, input="Capital of France?", max_output_tokens=40, temperature=0,
                             text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"answer"}
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.responses.create(model=MODEL_NAME, input="x", text={"format": {"type": "xml"}})
    assert exc.value.body["param"] == "text.format.type"


def test_conversations(sdk: openai.OpenAI) -> None:
    conv = sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
                                    metadata={"topic": "names"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "names"}
    r = sdk.responses.create(model=MODEL_NAME, input="What is my name?", conversation=conv.id, max_output_tokens=12,
                             temperature=0)
    items = list(sdk.conversations.items.list(conv.id, order="asc"))
    assert [i.type for i in items] == ["message"] * 3
    assert [i.role for i in items] == ["user", "user", "assistant"]
    assert items[-1].id == r.output[0].id
    added = sdk.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Thanks"}])
    assert len(added.data) == 1
    assert sdk.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id).id == added.data[0].id
    sdk.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    page = sdk.conversations.items.list(conv.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    assert len(list(page.iter_pages())) == 2
    assert sdk.conversations.update(conv.id, metadata={"topic": "x"}).metadata == {"topic": "x"}
    assert sdk.conversations.retrieve(conv.id).id == conv.id
    assert sdk.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.conversations.retrieve(conv.id)
    assert exc.value.body["param"] == "conversation_id"
