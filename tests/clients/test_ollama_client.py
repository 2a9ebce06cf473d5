"""The real `ollama` Python client against a live Parley server."""

from __future__ import annotations

import httpx
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


def test_format_json_is_accepted(client: ollama.Client) -> None:
    response = client.chat(model=NAME, format="json", options=OPTIONS,
                           messages=[{"role": "user", "content": "Describe a cat as JSON with a name field."}])
    assert isinstance(response.message.content, str) and response.message.content
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert client.generate(model=NAME, prompt="A cat as JSON.", format=schema, options=OPTIONS).done


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
