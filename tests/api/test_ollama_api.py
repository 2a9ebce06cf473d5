"""Ollama API through the real SmolLM2 model, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from backends.base import Event, Finished, FinishReason, GenerationHandle, GenerationRequest, TextDelta, Usage
from common.formats.output import OutputOptions
from common.generation.pipeline import Generation
from backends.sampling import SamplingParams
from common.formats.tools import ToolFormat
from tests.conftest import MODEL_NAME, Keys

NAME = f"{MODEL_NAME}:latest"
QUESTION = "What is the capital of France? Answer in one sentence."
SHORT = {"temperature": 0, "num_predict": 24}
DONE_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
               "eval_count", "eval_duration")


def ndjson(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def assert_final(chunk: dict[str, Any]) -> None:
    assert chunk["done"] is True
    assert chunk["done_reason"] in ("stop", "length")
    assert chunk["model"] == NAME and chunk["created_at"].endswith("Z")
    for key in DONE_FIELDS:
        assert isinstance(chunk[key], int), key
    assert chunk["prompt_eval_count"] > 5 and chunk["eval_count"] > 0
    assert chunk["total_duration"] > 0 and chunk["prompt_eval_duration"] > 0 and chunk["eval_duration"] > 0
    assert chunk["total_duration"] >= chunk["eval_duration"]


# -- listings -------------------------------------------------------------------
def test_root_version_and_tags(client: TestClient) -> None:
    for method in ("GET", "HEAD"):
        r = client.request(method, "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert client.get("/").text == "Ollama is running"
    assert client.get("/api/version").json() == {"version": "0.6.3"}
    models = client.get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == [NAME]
    m = models[0]
    assert m["model"] == NAME and m["size"] > 50_000_000
    assert len(m["digest"]) == 64 and m["modified_at"].endswith("Z")
    assert m["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "135M", "quantization_level": "Q4_1"}


def test_show(client: TestClient) -> None:
    r = client.post("/api/show", json={"model": NAME})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "<|im_start|>" in body["template"]
    assert body["details"]["family"] == "llama"
    info = body["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
    assert info["general.parameter_count"] > 100_000_000
    assert not any(k in info for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    assert "completion" in body["capabilities"]
    assert 'stop                           "<|im_end|>"' in body["parameters"]
    assert body["modelfile"].startswith("# Modelfile") and body["license"] == "apache-2.0"
    # `name` is accepted too, and the tag is optional.
    assert client.post("/api/show", json={"name": MODEL_NAME}).status_code == 200
    # A model pulled as hf.co/<owner>/<repo>:<quant> answers to that name (its folder is the repo name).
    assert client.post("/api/show", json={"model": f"hf.co/someone/{MODEL_NAME}:Q4_1"}).status_code == 200


def test_ps(client: TestClient) -> None:
    client.post("/api/generate", json={"model": NAME})  # make sure it is loaded
    models = client.get("/api/ps").json()["models"]
    assert len(models) == 1
    m = models[0]
    assert m["name"] == NAME and m["context_length"] == 2048 and m["size_vram"] == 0
    assert m["size"] > 0 and len(m["digest"]) == 64 and m["expires_at"]
    assert m["details"]["quantization_level"] == "Q4_1"


# -- generate -----------------------------------------------------------------------
def test_generate_non_streaming(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": NAME, "prompt": QUESTION, "stream": False, "options": SHORT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["response"]
    assert_final(body)


def test_generate_stream_matches_non_streaming(client: TestClient) -> None:
    payload = {"model": NAME, "prompt": QUESTION, "system": "You are a helpful assistant.", "options": SHORT}
    with client.stream("POST", "/api/generate", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        chunks = ndjson(r)
    assert all(c["done"] is False and c["response"] for c in chunks[:-1])
    assert chunks[-1]["response"] == ""
    assert_final(chunks[-1])
    text = "".join(c["response"] for c in chunks)
    plain = client.post("/api/generate", json={**payload, "stream": False}).json()
    assert text == plain["response"]
    assert chunks[-1]["eval_count"] == plain["eval_count"]


def test_generate_raw(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": MODEL_NAME, "prompt": "The capital of France is", "raw": True,
                                           "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"].strip() and body["prompt_eval_count"] < 10


def test_num_predict_gives_length(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": NAME, "prompt": "Write a long story about a dragon.",
                                           "stream": False, "options": {"num_predict": 5, "temperature": 0}})
    body = r.json()
    assert body["done_reason"] == "length" and body["eval_count"] == 5


def test_same_seed_same_text(client: TestClient) -> None:
    payload = {"model": NAME, "prompt": "Tell me a short story.", "stream": False,
               "options": {"temperature": 1, "seed": 1234, "num_predict": 24}}
    # Warm the prompt's cache first: a reused prefix computed in another batch shape can flip a
    # borderline token by float rounding, so compared runs must start from the same cache state.
    client.post("/api/generate", json={**payload, "options": {**payload["options"], "seed": 7}})
    first = client.post("/api/generate", json=payload).json()["response"]
    assert client.post("/api/generate", json=payload).json()["response"] == first
    others = {client.post("/api/generate", json={**payload, "options": {**payload["options"], "seed": s}})
              .json()["response"] for s in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_stop_option(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": NAME, "prompt": "Count from 1 to 10, separated by commas.",
                                           "stream": False, "options": {"temperature": 0, "num_predict": 40,
                                                                        "stop": ["5"]}})
    body = r.json()
    assert "5" not in body["response"] and body["done_reason"] == "stop"


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_format_schema_always_validates(client: TestClient) -> None:
    for seed in range(3):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 80}
        r = client.post("/api/generate", json={"model": NAME, "prompt": "Describe a person.", "format": PERSON,
                                               "stream": False, "options": options})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["done_reason"] == "stop", body
        jsonschema.validate(json.loads(body["response"]), PERSON)
        payload = {"model": NAME, "messages": [{"role": "user", "content": "Describe a person."}], "format": PERSON,
                   "options": options}
        with client.stream("POST", "/api/chat", json=payload) as r:
            chunks = ndjson(r)
        assert chunks[-1]["done_reason"] == "stop"
        jsonschema.validate(json.loads("".join(c["message"]["content"] for c in chunks)), PERSON)


def test_format_json_gives_an_object(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": NAME, "prompt": "Give me a JSON object with a name.",
                                           "format": "json", "stream": False,
                                           "options": {"temperature": 0, "num_predict": 60}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"].lstrip().startswith("{")
    if body["done_reason"] == "stop":  # any object is allowed, so only a finished one must parse
        assert isinstance(json.loads(body["response"]), dict)
    r = client.post("/api/generate", json={"model": NAME, "prompt": "hi", "format": {"type": "nonsense"}})
    assert r.status_code == 400 and "'format'" in r.json()["error"] and "Fix the JSON schema" in r.json()["error"]


def test_forced_preset_beats_the_options(client: TestClient) -> None:
    payload = {"model": NAME, "prompt": "Tell me a story.", "stream": False,
               "options": {"temperature": 1.5, "seed": 5, "num_predict": 16}}
    # Warm the prompt's cache first: a reused prefix computed in another batch shape can flip a
    # borderline token by float rounding, so compared runs must start from the same cache state.
    client.post("/api/generate", json={**payload, "options": {**payload["options"], "temperature": 0}})
    greedy = client.post("/api/generate", json={**payload, "options": {**payload["options"], "temperature": 0}})
    try:
        r = client.post("/v1/sampling/override/switch",
                        json={"overrides": {"temperature": {"override": 0.0, "force": True}}})
        assert r.status_code == 200, r.text
        assert client.post("/api/generate", json=payload).json()["response"] == greedy.json()["response"]
    finally:
        client.post("/v1/sampling/override/unload")


# -- chat -----------------------------------------------------------------------
def test_chat_non_streaming(client: TestClient) -> None:
    r = client.post("/api/chat", json={"model": NAME, "messages": [{"role": "user", "content": QUESTION}],
                                       "stream": False, "options": SHORT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"]["role"] == "assistant" and "Paris" in body["message"]["content"]
    assert_final(body)


def test_chat_stream(client: TestClient) -> None:
    payload = {"model": NAME, "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": QUESTION}],
               "options": SHORT, "tools": [{"type": "function", "function": {"name": "noop", "parameters": {}}}]}
    with client.stream("POST", "/api/chat", json=payload) as r:
        assert r.status_code == 200
        chunks = ndjson(r)
    assert all(c["message"]["role"] == "assistant" and not c["done"] for c in chunks[:-1])
    assert chunks[-1]["message"] == {"role": "assistant", "content": ""}
    assert_final(chunks[-1])
    text = "".join(c["message"]["content"] for c in chunks)
    assert text == client.post("/api/chat", json={**payload, "stream": False}).json()["message"]["content"]


def test_chat_continues_a_final_assistant_message(client: TestClient) -> None:
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France is"}]
    r = client.post("/api/chat", json={"model": NAME, "messages": messages, "stream": False,
                                       "options": {"temperature": 0, "num_predict": 6}})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["message"]["content"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _assert_ollama_calls(calls: list[dict[str, Any]]) -> None:
    for call in calls:
        assert list(call) == ["function"] and call["function"]["name"] == "get_weather"
        assert isinstance(call["function"]["arguments"], dict)


def test_chat_with_tools_is_well_formed(client: TestClient) -> None:
    """The tiny model may or may not call the tool; either way the answer has Ollama's shape."""
    payload = {"model": NAME, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
               "tools": [WEATHER_TOOL], "stream": False, "options": {"temperature": 0, "num_predict": 40}}
    body = client.post("/api/chat", json=payload).json()
    assert body["done"] is True and body["message"]["role"] == "assistant"
    assert isinstance(body["message"]["content"], str)
    _assert_ollama_calls(body["message"].get("tool_calls", []))
    with client.stream("POST", "/api/chat", json={**payload, "stream": True}) as r:
        chunks = ndjson(r)
    assert chunks[-1]["done"] is True and all(not c["done"] for c in chunks[:-1])
    _assert_ollama_calls([c for chunk in chunks for c in chunk["message"].get("tool_calls", [])])


def test_think_leaves_an_answer_without_reasoning_as_it_is(client: TestClient) -> None:
    payload = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "stream": False, "options": SHORT}
    plain = client.post("/api/chat", json=payload).json()["message"]
    thought = client.post("/api/chat", json={**payload, "think": True}).json()["message"]
    # SmolLM2 writes no reasoning markers: nothing is split off.
    assert thought == plain and "thinking" not in thought


# -- load / unload ----------------------------------------------------------------
def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": NAME})
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = client.post("/api/generate", json={"model": NAME, "keep_alive": 0})
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert client.get("/api/ps").json()["models"] == []
    # The next request loads it again and says how long that took.
    r = client.post("/api/generate", json={"model": NAME, "prompt": "Hi", "stream": False,
                                           "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["load_duration"] > 0
    assert [m["name"] for m in client.get("/api/ps").json()["models"]] == [NAME]
    # The same through /api/chat with no messages.
    for keep_alive, reason in (("0s", "unload"), (None, "load")):
        r = client.post("/api/chat", json={"model": NAME, "messages": [], "keep_alive": keep_alive})
        assert r.json()["done_reason"] == reason and r.json()["message"]["content"] == ""
    assert client.get("/api/ps").json()["models"] != []


# -- errors ---------------------------------------------------------------------
@pytest.mark.parametrize(("path", "payload", "status", "words"), [
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404, "not found"),
    ("/api/chat", {"model": f"{MODEL_NAME}:7b", "messages": []}, 404, "only the tag 'latest'"),
    ("/api/show", {"model": "nope:latest"}, 404, NAME),
    ("/api/generate", {"prompt": "hi"}, 400, "'model' is required"),
    ("/api/generate", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("/api/chat", {"model": NAME, "messages": "hello"}, 400, "messages"),
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": {"repeat_penalty": -1}}, 400,
     "options.repeat_penalty"),
    ("/api/generate", {"model": NAME, "prompt": "hi", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": NAME, "prompt": "hi", "suffix": "end"}, 400, "suffix is not supported"),
    ("/api/generate", {"model": NAME, "prompt": "hi", "images": ["aGk="]}, 400, "cannot read images"),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "cannot read images"),
    ("/api/embed", {"model": NAME, "input": "hi"}, 400, "does not support embeddings"),
    ("/api/embeddings", {"model": NAME, "prompt": "hi"}, 400, "does not support embeddings"),
    ("/api/embed", {"model": "nomic-embed-text", "input": "hi"}, 404, "model 'nomic-embed-text' not found"),
    ("/api/embeddings", {"model": "nomic-embed-text:v1.5", "prompt": "hi"}, 404, "POST /api/pull"),
    ("/api/pull", {"model": "llama3"}, 400, "hf.co/<owner>/<repo>"),
    ("/api/copy", {"source": NAME, "destination": "x"}, 501, "model directory"),
    ("/api/create", {"model": "x"}, 501, "not supported"),
    ("/api/push", {"model": NAME}, 501, "not supported"),
])
def test_error_shapes(client: TestClient, path: str, payload: dict[str, Any], status: int, words: str) -> None:
    r = client.post(path, json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert words in body["error"]


def test_malformed_json_and_delete(client: TestClient) -> None:
    r = client.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.request("DELETE", "/api/delete", json={"model": NAME})
    assert r.status_code == 501 and "error" in r.json()


def test_auth(app_env: tuple[TestClient, Keys]) -> None:
    c, keys = app_env
    bare = TestClient(c.app)
    r = bare.get("/api/tags")
    assert r.status_code == 401 and list(r.json()) == ["error"] and "API key" in r.json()["error"]
    assert bare.get("/").status_code == 200  # the liveness probe needs no key
    assert bare.get("/api/version", headers=keys.api_headers()).status_code == 200
    r = bare.post("/api/pull", json={"model": "hf.co/a/b"}, headers=keys.api_headers())
    assert r.status_code == 403 and "admin" in r.json()["error"]


def test_pull_failure_is_a_clean_error(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with client.stream("POST", "/api/pull", json={"model": "hf.co/parley-test/no-such-model:Q4_K_M"}) as r:
        assert r.status_code == 200
        lines = ndjson(r)
    assert lines[0] == {"status": "pulling manifest"}
    assert list(lines[-1]) == ["error"] and "no-such-model" in lines[-1]["error"]
    r = client.post("/api/pull", json={"model": "parley-test/no-such-model", "stream": False})
    assert r.status_code == 503 and "Cannot reach the Hugging Face Hub" in r.json()["error"]
    assert NAME in [m["name"] for m in client.get("/api/tags").json()["models"]]
    assert len(client.get("/api/tags").json()["models"]) == 1  # the failed pull left no folder behind


# -- request interpretation (no model needed) ----------------------------------------
@pytest.mark.parametrize(("value", "unload"), [
    (0, True), (0.0, True), ("0", True), ("0s", True), ("0m0s", True), (None, False), (-1, False),
    ("5m", False), ("-1", False), ("10s", False), ("", False),
])
def test_keep_alive_zero(value: Any, unload: bool) -> None:
    from endpoints.ollama.mapping import is_unload

    assert is_unload(value) is unload


def test_pull_names() -> None:
    from common.errors import BadRequestError
    from endpoints.ollama.mapping import parse_pull_name

    req = parse_pull_name("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    assert req.repo_id == "bartowski/SmolLM2-135M-Instruct-GGUF" and "*Q4_K_M*.gguf" in req.include
    assert parse_pull_name("owner/repo").include == [] and parse_pull_name("owner/repo:latest").include == []
    for bad in ("llama3", "hf.co/a/b/c", "../x/y", "a/b:bad tag"):
        with pytest.raises(BadRequestError):
            parse_pull_name(bad)


def test_options_mapping() -> None:
    from common.models.presets import Preset
    from endpoints.ollama.mapping import sent_options, to_sampling_params
    from endpoints.ollama.protocol import Options

    defaults = to_sampling_params(None, n_ctx=2048, route="test")
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.repetition_penalty) == (0.8, 40, 0.9, 1.1)
    assert defaults.penalty_range == 64 and defaults.max_tokens is None and defaults.seed is None
    opts = Options(num_predict=-2, typical_p=0.5, repeat_last_n=0, mirostat=2, seed=-1, stop="x", num_ctx=99999,
                   penalize_newline=True, num_gpu=1, made_up=3)
    p = to_sampling_params(opts, n_ctx=2048, route="test")
    assert (p.max_tokens, p.typical, p.penalty_range, p.mirostat_mode, p.seed, p.stop) == (2048, 0.5, 0, 2, None,
                                                                                            ("x",))
    assert to_sampling_params(Options(num_predict=-1), n_ctx=2048, route="test").max_tokens is None
    # Only what the client sent is "sent"; a preset fills the rest before Ollama's defaults do.
    assert sent_options(Options(), 2048) == {}
    assert sent_options(Options(temperature=0.3, seed=9, num_predict=5), 2048) == {
        "temperature": 0.3, "seed": 9, "max_tokens": 5}
    preset = Preset.from_mapping("p", {"top_k": 3, "temperature": 0.1})
    p = to_sampling_params(Options(temperature=0.3), n_ctx=2048, route="test", preset=preset)
    assert (p.temperature, p.top_k, p.top_p) == (0.3, 3, 0.9)


class _ScriptedHandle(GenerationHandle):
    def __init__(self, events: list[Event]) -> None:
        self.request = GenerationRequest([1], SamplingParams())
        self._events = events

    async def events(self) -> AsyncIterator[Event]:
        for ev in self._events:
            yield ev

    def cancel(self) -> None:
        pass


TOOL_TEXT = [
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    'is", "days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "argu',
    'ments": {}}\n</tool_call>',
]
TOOLS = OutputOptions(reasoning=False, tool_format=ToolFormat.HERMES, tool_names=("get_weather", "get_time"))
CALLS = [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}},
         {"function": {"name": "get_time", "arguments": {}}}]


def _script(texts: list[str], reason: FinishReason = FinishReason.STOP) -> Generation:
    return Generation([_ScriptedHandle([*(TextDelta(t) for t in texts), Finished(reason, Usage(3, len(texts)))])])


def _stream(texts: list[str], options: OutputOptions, *, chat: bool = True,
            reason: FinishReason = FinishReason.STOP) -> list[dict[str, Any]]:
    from endpoints.ollama import serving

    async def run() -> list[str]:
        return [line async for line in serving.generation_stream(
            _script(texts, reason), MODEL_NAME, serving.Timing(), options, chat=chat)]

    return [json.loads(line) for line in asyncio.run(run())]


def _whole(texts: list[str], options: OutputOptions, *, chat: bool = True,
           reason: FinishReason = FinishReason.STOP) -> dict[str, Any]:
    from endpoints.ollama import serving

    return asyncio.run(serving.generation_response(_script(texts, reason), MODEL_NAME, serving.Timing(), options,
                                                   chat=chat))


def test_tool_calls_in_ollama_shape() -> None:
    message = _whole(TOOL_TEXT, TOOLS)["message"]
    assert message == {"role": "assistant", "content": "Let me check.", "tool_calls": CALLS}
    chunks = _stream(TOOL_TEXT, TOOLS)
    # Each call is sent once, in the chunk where it completes (the first before the second is written).
    assert [c["message"].get("tool_calls") for c in chunks] == [None, [CALLS[0]], [CALLS[1]], None]
    assert chunks[0]["message"]["content"] == "Let me check." and chunks[-1]["done"] is True
    assert chunks[-1]["message"] == {"role": "assistant", "content": ""} and chunks[-1]["done_reason"] == "stop"
    # A call the length limit cut short is dropped, streamed or not.
    cut = [TOOL_TEXT[0], TOOL_TEXT[1] + 'ments": {"tz": "Europe/']
    assert _whole(cut, TOOLS, reason=FinishReason.LENGTH)["message"]["tool_calls"] == [CALLS[0]]
    streamed = [c for chunk in _stream(cut, TOOLS, reason=FinishReason.LENGTH)
                for c in chunk["message"].get("tool_calls", [])]
    assert streamed == [CALLS[0]]
    # Without tools, the same text is plain content.
    plain = OutputOptions(reasoning=False)
    assert _whole(TOOL_TEXT, plain)["message"] == {"role": "assistant", "content": "".join(TOOL_TEXT)}


def test_thinking_is_split_only_when_asked() -> None:
    texts = ["<think>The user wants", " a city.</think>\n\nParis", " is the capital."]
    think = OutputOptions(reasoning=True)
    assert _whole(texts, think)["message"] == {"role": "assistant", "content": "Paris is the capital.",
                                               "thinking": "The user wants a city."}
    generated = _whole(texts, think, chat=False)
    assert (generated["response"], generated["thinking"]) == ("Paris is the capital.", "The user wants a city.")
    chunks = _stream(texts, think)
    assert "".join(c["message"].get("thinking", "") for c in chunks) == "The user wants a city."
    assert "".join(c["message"]["content"] for c in chunks) == "Paris is the capital."
    streamed = _stream(texts, think, chat=False)
    assert "".join(c.get("thinking", "") for c in streamed) == "The user wants a city."
    as_is = _whole(texts, OutputOptions(reasoning=False))["message"]
    assert as_is == {"role": "assistant", "content": "".join(texts)}


def test_parameter_size_labels() -> None:
    from common.models.gguf_info import human_number

    assert [human_number(n) for n in (8_000_000_000, 7_240_000_000, 135_000_000, 134_515_008, 600_000, 12)] == [
        "8B", "7.2B", "135M", "134.52M", "600K", "12"]


def test_pull_from_a_hub(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull that works, against a local stand-in for the hub: Q4_K_M chosen, streamed progress, listed."""
    import shutil
    from pathlib import Path

    import huggingface_hub.constants

    from tests.fake_hub import FakeHub

    folder = Path(client.app.state.models.model_dir) / "fake-pull"
    with FakeHub() as hub:
        hub.add_repo("someone/fake-pull", {
            "fake-pull-Q4_K_M.gguf": b"not really a gguf" * 1000,
            "fake-pull-Q8_0.gguf": b"not this one" * 1000,
            "README.md": b"readme",
        })
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        try:
            with client.stream("POST", "/api/pull", json={"model": "hf.co/someone/fake-pull"}) as r:
                lines = ndjson(r)
            assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
            progress = lines[1:-1]
            assert progress and all(p["status"] == "pulling someone/fake-pull" for p in progress)
            assert progress[-1]["completed"] == progress[-1]["total"] == 17000
            assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["fake-pull-Q4_K_M.gguf"]
            # A broken file is listed with empty details rather than failing the listing.
            listed = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
            assert listed["fake-pull:latest"]["details"]["family"] == ""
            # A quantization the repo lacks: a clean 404 naming it.
            r = client.post("/api/pull", json={"model": "someone/fake-pull:Q2_K", "stream": False})
            assert r.status_code == 404 and "Q2_K" in r.json()["error"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
