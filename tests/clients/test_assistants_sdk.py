"""The openai SDK's beta Assistants client (assistants, threads, messages, runs, steps) against Parley on a
real socket."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import MODEL_NAME, LiveServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def sdk(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key=live_server.keys.api, max_retries=0)


def test_assistants_crud_and_cursor_list(sdk: openai.OpenAI) -> None:
    made = [sdk.beta.assistants.create(model=MODEL_NAME, name=f"a{i}", instructions="Be brief.") for i in range(3)]
    assert all(a.id.startswith("asst_") for a in made)
    assert sdk.beta.assistants.retrieve(made[0].id).name == "a0"
    assert sdk.beta.assistants.update(made[0].id, name="renamed", temperature=0.5).name == "renamed"
    page = sdk.beta.assistants.list(limit=2, order="asc", after=made[0].id)
    assert [a.id for a in page.data] == [made[1].id, made[2].id]
    ids = [a.id for a in sdk.beta.assistants.list(limit=1, order="desc")]  # the SDK follows the cursor
    assert ids.index(made[2].id) < ids.index(made[1].id) < ids.index(made[0].id)
    assert sdk.beta.assistants.delete(made[2].id).deleted
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.beta.assistants.retrieve(made[2].id)
    assert exc.value.body["param"] == "assistant_id"


def test_threads_messages_and_create_and_poll(sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model=MODEL_NAME, instructions="You answer in a few words.", temperature=0)
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     metadata={"k": "v"})
    assert thread.id.startswith("thread_") and sdk.beta.threads.retrieve(thread.id).metadata == {"k": "v"}
    run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                max_completion_tokens=10)
    assert run.id.startswith("run_") and run.status in ("completed", "incomplete")
    assert run.usage is not None and 0 < run.usage.completion_tokens <= 10
    assert run.instructions == "You answer in a few words." and run.temperature == 0
    messages = list(sdk.beta.threads.messages.list(thread_id=thread.id, order="asc"))
    assert [m.role for m in messages] == ["user", "assistant"]
    answer = messages[1]
    assert answer.id.startswith("msg_") and answer.run_id == run.id and answer.content[0].text.value.strip()
    assert sdk.beta.threads.messages.retrieve(answer.id, thread_id=thread.id).id == answer.id
    steps = list(sdk.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id))
    assert [s.type for s in steps] == ["message_creation"]
    assert steps[0].step_details.message_creation.message_id == answer.id
    assert [r.id for r in sdk.beta.threads.runs.list(thread_id=thread.id)] == [run.id]
    assert sdk.beta.threads.update(thread.id, metadata={"k": "w"}).metadata == {"k": "w"}
    assert sdk.beta.threads.delete(thread.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.beta.threads.messages.list(thread_id=thread.id)


def test_streaming_run(sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model=MODEL_NAME, temperature=0)
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "Name three colors."}])
    with sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id, max_completion_tokens=8,
                                      temperature=0) as stream:
        events = [e.event for e in stream]
        final = stream.get_final_run()
        text = "".join(m.content[0].text.value for m in stream.get_final_messages())
    assert events[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    for name in ("thread.message.created", "thread.message.delta", "thread.message.completed"):
        assert name in events
    assert events[-1] in ("thread.run.completed", "thread.run.incomplete") and final.status in ("completed",
                                                                                               "incomplete")
    stored = list(sdk.beta.threads.messages.list(thread_id=thread.id, order="asc"))
    assert stored[-1].content[0].text.value == text and text


def test_function_tool_requires_action_then_continues(sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model=MODEL_NAME, tools=[WEATHER], temperature=0)
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    run = sdk.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, max_completion_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert run.status == "requires_action"
    calls = run.required_action.submit_tool_outputs.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    with pytest.raises(openai.ConflictError) as conflict:  # one active run per thread
        sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    assert conflict.value.body["param"] == "thread_id"
    with sdk.beta.threads.runs.submit_tool_outputs_stream(  # continued as a stream
        thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": calls[0].id, "output": "21 C, sunny"}],
    ) as stream:
        events = [e.event for e in stream]
        done = stream.get_final_run()
    assert events[0] == "thread.run.step.completed" and "thread.message.delta" in events
    assert done.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as late:
        sdk.beta.threads.runs.submit_tool_outputs(thread_id=thread.id, run_id=run.id,
                                                  tool_outputs=[{"tool_call_id": calls[0].id, "output": "x"}])
    assert late.value.body["param"] == "run_id"
    steps = list(sdk.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id, order="asc"))
    assert [s.type for s in steps] == ["tool_calls", "message_creation"]
    assert steps[0].step_details.tool_calls[0].function.output == "21 C, sunny"


def test_cancel(sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model=MODEL_NAME)
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "Tell me a long story."}])
    run = sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, max_completion_tokens=1000)
    assert run.status == "queued"
    cancelled = sdk.beta.threads.runs.cancel(run_id=run.id, thread_id=thread.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.beta.threads.runs.cancel(run_id=run.id, thread_id=thread.id)
    assert exc.value.body["param"] == "run_id"
    # The thread is free again, and the cancelled run wrote no message.
    again = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                  max_completion_tokens=4)
    assert again.status in ("completed", "incomplete")
    runs = {m.run_id for m in sdk.beta.threads.messages.list(thread_id=thread.id) if m.role == "assistant"}
    assert runs == {again.id}


def test_a_streamed_run_whose_client_leaves_ends_cancelled(sdk: openai.OpenAI, live_server: LiveServer) -> None:
    import time

    import httpx

    assistant = sdk.beta.assistants.create(model=MODEL_NAME)
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "Tell me a long story."}])
    headers = {"Authorization": f"Bearer {live_server.keys.api}"}
    body = {"assistant_id": assistant.id, "stream": True, "max_completion_tokens": 1000}
    with httpx.stream("POST", f"{live_server.base_url}/v1/threads/{thread.id}/runs", json=body, headers=headers,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line == "event: thread.message.delta":
                break  # leave mid-stream
    run = sdk.beta.threads.runs.list(thread_id=thread.id).data[0]
    for _ in range(600):
        if run.status == "cancelled":
            break
        time.sleep(0.05)
        run = sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert run.status == "cancelled"
    # The thread is free for the next run.
    assert sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                 max_completion_tokens=2).status in ("completed", "incomplete")
