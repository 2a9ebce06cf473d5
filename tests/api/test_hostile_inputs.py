"""Hostile input per dialect, against the app with the real model.

Every malformed, out-of-range or malicious request must come back as a 4xx in
its dialect's error shape, naming the field at fault; none may crash the
server or answer 5xx, and the server must still serve normal requests after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from common.errors import Dialect
from tests.conftest import MODEL_NAME, Keys

OPENAI, KOBOLD, OLLAMA, LLAMACPP = Dialect.OPENAI, Dialect.KOBOLD, Dialect.OLLAMA, Dialect.LLAMACPP
ANTHROPIC = Dialect.ANTHROPIC
USER = [{"role": "user", "content": "Hi"}]
INJECTION = "{{ cycler.__init__.__globals__ }}{% include '/etc/passwd' %}{{ ''.__class__.__mro__ }}"
TRAVERSALS = ["../x", "/etc/passwd", "..\\x", "a/../../b", "%2e%2e/x", "a\x00b"]


@dataclass(frozen=True)
class Route:
    path: str
    dialect: Dialect
    body: dict[str, Any]
    text: tuple[str | int, ...]  # a string field of the body
    number: tuple[str | int, ...] = ("x",)  # a numeric field ("x": unknown, still parsed strictly)
    admin: bool = False
    negative: Any = None  # a negative value the number field refuses

    @property
    def id(self) -> str:
        return self.path


ROUTES = [
    Route("/v1/chat/completions", OPENAI, {"messages": USER, "max_tokens": 2}, ("messages", 0, "content"),
          ("max_tokens",), negative=-1),
    Route("/v1/completions", OPENAI, {"prompt": "Hi", "max_tokens": 2}, ("prompt",), ("max_tokens",), negative=-1),
    Route("/v1/token/encode", OPENAI, {"text": "Hi"}, ("text",)),
    Route("/v1/token/decode", OPENAI, {"tokens": [1]}, ("model",), ("tokens", 0), negative=-1),
    Route("/v1/model/load", OPENAI, {"model_name": "../never-loaded"}, ("model_name",), ("max_seq_len",),
          admin=True, negative=-1),
    Route("/v1/template/switch", OPENAI, {"prompt_template_name": "../nope"}, ("prompt_template_name",), admin=True),
    Route("/v1/sampling/override/switch", OPENAI, {"preset": "../nope"}, ("preset",), admin=True),
    Route("/infill", LLAMACPP, {"input_prefix": "a", "input_suffix": "b", "n_predict": 2}, ("input_prefix",),
          ("n_predict",), negative=-5),
    Route("/completion", LLAMACPP, {"prompt": "Hi", "n_predict": 2}, ("prompt",), ("n_predict",), negative=-5),
    Route("/tokenize", LLAMACPP, {"content": "Hi"}, ("content",)),
    Route("/detokenize", LLAMACPP, {"tokens": [1]}, ("model",), ("tokens", 0), negative=-1),
    Route("/api/v1/generate", KOBOLD, {"prompt": "Hi", "max_length": 2}, ("prompt",), ("max_length",), negative=-1),
    Route("/api/extra/generate/stream", KOBOLD, {"prompt": "Hi", "max_length": 2}, ("prompt",), ("top_k",),
          negative=-3),
    Route("/api/extra/tokencount", KOBOLD, {"prompt": "Hi"}, ("prompt",)),
    Route("/api/extra/abort", KOBOLD, {"genkey": "nope"}, ("genkey",)),
    Route("/api/chat", OLLAMA, {"model": MODEL_NAME, "messages": USER, "stream": False, "options": {"num_predict": 2}},
          ("messages", 0, "content"), ("options", "num_predict"), negative=-3),
    Route("/api/generate", OLLAMA, {"model": MODEL_NAME, "prompt": "Hi", "stream": False,
                                    "options": {"num_predict": 2}}, ("prompt",), ("options", "num_predict"),
          negative=-7),
    Route("/api/show", OLLAMA, {"model": MODEL_NAME}, ("model",)),
    Route("/api/pull", OLLAMA, {"model": "../nope"}, ("model",), admin=True),
    Route("/v1/messages", ANTHROPIC, {"model": MODEL_NAME, "messages": USER, "max_tokens": 2},
          ("messages", 0, "content"), ("max_tokens",), negative=-1),
    Route("/v1/messages/count_tokens", ANTHROPIC, {"model": MODEL_NAME, "messages": USER}, ("system",)),
]


def dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    target: Any = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


def headers(keys: Keys, route: Route | None = None, *, admin: bool = False) -> dict[str, str]:
    key = keys.admin if admin or (route is not None and route.admin) else keys.api
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def error_text(r: Any, dialect: Dialect) -> str:
    """Assert a 4xx in the dialect's error shape; return its message (and param) for matching."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    if dialect is OPENAI:
        err = body["error"]
        assert {"message", "type", "param", "code"} <= set(err), body
        assert isinstance(err["message"], str) and err["message"]
        return f"{err['message']} {err['param']}"
    if dialect is LLAMACPP:
        err = body["error"]
        assert err["code"] == r.status_code and {"message", "type", "param"} <= set(err), body
        assert isinstance(err["message"], str) and err["message"]
        return f"{err['message']} {err['param']}"
    if dialect is ANTHROPIC:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        return body["error"]["message"]
    if dialect is KOBOLD:
        detail = body["detail"]
        assert isinstance(detail["msg"], str) and detail["msg"] and isinstance(detail["type"], str), body
        return f"{detail['msg']} {detail.get('param')}"
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def post_raw(client: TestClient, keys: Keys, route: Route, raw: bytes) -> Any:
    return client.post(route.path, content=raw, headers=headers(keys, route))


def raw_with(route: Route, path: tuple[str | int, ...], literal: str) -> bytes:
    """The route's body with one field replaced by a raw JSON literal (NaN, an escape, ...)."""
    marker = "__HOSTILE_MARKER__"
    return json.dumps(with_value(route.body, path, marker)).replace(f'"{marker}"', literal).encode()


# -- malformed bodies, on every route ------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000
BODY_CASES = {
    "malformed": (b'{"prompt": ', "not valid JSON"),
    "array": (b"[1, 2]", "object"),
    "string": (b'"hello"', "object"),
    "number": (b"5", "object"),
    "deep_array": (DEEP.encode(), "nests deeper"),
    "invalid_utf8": (b'{"prompt": "caf\xc3\x28 \xff"}', "UTF-8"),
}


@pytest.mark.parametrize("case", list(BODY_CASES), ids=list(BODY_CASES))
@pytest.mark.parametrize("route", ROUTES, ids=[r.id for r in ROUTES])
def test_malformed_bodies(app_env: tuple[TestClient, Keys], route: Route, case: str) -> None:
    client, keys = app_env
    raw, expected = BODY_CASES[case]
    text = error_text(post_raw(client, keys, route, raw), route.dialect)
    if route.path == "/api/extra/abort" and case in ("array", "string", "number"):
        expected = "valid dictionary"  # the body is optional there: pydantic words it so
    assert expected in text, text


@pytest.mark.parametrize("route", ROUTES, ids=[r.id for r in ROUTES])
def test_strict_json_values_name_the_field(app_env: tuple[TestClient, Keys], route: Route) -> None:
    client, keys = app_env
    number, text_field = dotted(route.number), dotted(route.text)
    for literal, word in (("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
                          (str(2**70), "2**64"), ("9" * 5000, "digits")):
        text = error_text(post_raw(client, keys, route, raw_with(route, route.number, literal)), route.dialect)
        assert word in text, text
        if literal != "9" * 5000:  # too long for Python's int parser: no field can be named
            assert number in text, text
    text = error_text(post_raw(client, keys, route, raw_with(route, route.text, '"a\\ud800b"')), route.dialect)
    assert "surrogate" in text and text_field in text, text
    key_in_body = json.dumps(route.body)[:-1] + ', "\\udc00": 1}'
    assert "surrogate" in error_text(post_raw(client, keys, route, key_in_body.encode()), route.dialect)
    nested: Any = 1
    for _ in range(80):
        nested = [nested]
    deep = error_text(client.post(route.path, json=with_value(route.body, ("x",), nested),
                                  headers=headers(keys, route)), route.dialect)
    assert "nests deeper" in deep and "x[0]" in deep, deep


@pytest.mark.parametrize("route", ROUTES, ids=[r.id for r in ROUTES])
def test_wrong_types_huge_and_negative_numbers(app_env: tuple[TestClient, Keys], route: Route) -> None:
    client, keys = app_env
    text_field = dotted(route.text)
    for wrong in ({"a": 1}, [{"a": 1}], 12.5):
        r = client.post(route.path, json=with_value(route.body, route.text, wrong), headers=headers(keys, route))
        assert text_field in error_text(r, route.dialect)
    if route.negative is None:
        return
    number = dotted(route.number)
    for value in (route.negative, 1e308, "many", [3], True if route.number != ("tokens", 0) else "1x"):
        if value is True:
            continue  # a JSON true is a valid integer 1 to pydantic's lax mode
        r = client.post(route.path, json=with_value(route.body, route.number, value), headers=headers(keys, route))
        text = error_text(r, route.dialect)
        assert number in text or (value == route.negative and str(route.number[0]) in text), (value, text)


# -- field-specific cases ------------------------------------------------------------------------
def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 2, **fields}


def kobold(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hi", "max_length": 2, **fields}


def ollama_chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": USER, "stream": False, **fields}


FIELD_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # OpenAI chat
    ("/v1/chat/completions", "temperature", chat(temperature=-5), "temperature"),
    ("/v1/chat/completions", "max_tokens_bool", chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", "alias_bool", chat(rep_pen=False), "rep_pen"),
    ("/v1/token/decode", "token_bool", {"tokens": [1, True]}, "tokens"),
    ("/api/v1/generate", "max_length_bool", kobold(max_length=False), "max_length"),
    ("/api/chat", "num_predict_bool", ollama_chat(options={"num_predict": True}), "num_predict"),
    ("/infill", "n_predict_bool", {"input_prefix": "a", "n_predict": True}, "n_predict"),
    ("/v1/chat/completions", "top_k", chat(top_k=-3), "top_k"),
    ("/v1/chat/completions", "n", chat(n=0), "n"),
    ("/v1/chat/completions", "n_huge", chat(n=2**40), "n"),
    ("/v1/chat/completions", "top_p", chat(top_p=1e308), "top_p"),
    ("/v1/chat/completions", "seed_float", chat(seed=1e308), "seed"),
    ("/v1/chat/completions", "max_completion", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("/v1/chat/completions", "stop", chat(stop={"a": 1}), "stop"),
    ("/v1/chat/completions", "stream", chat(stream="maybe"), "stream"),
    ("/v1/chat/completions", "no_messages", {"max_tokens": 2}, "messages"),
    ("/v1/chat/completions", "empty_messages", chat(messages=[]), "messages"),
    ("/v1/chat/completions", "messages_string", chat(messages="Hi"), "messages"),
    ("/v1/chat/completions", "message_string", chat(messages=["Hi"]), "messages"),
    ("/v1/chat/completions", "unknown_role", chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ("/v1/chat/completions", "role_list", chat(messages=[{"role": ["user"], "content": "x"}]), "messages[0].role"),
    ("/v1/chat/completions", "no_role", chat(messages=[{"content": "x"}]), "messages[0].role"),
    ("/v1/chat/completions", "null_content", chat(messages=[{"role": "user", "content": None}]),
     "messages[0].content"),
    ("/v1/chat/completions", "absent_content", chat(messages=[{"role": "user"}]), "messages[0].content"),
    ("/v1/chat/completions", "assistant_no_content", chat(messages=[*USER, {"role": "assistant"}]),
     "messages[1].content"),
    ("/v1/chat/completions", "content_number", chat(messages=[{"role": "user", "content": 5}]),
     "messages[0].content"),
    ("/v1/chat/completions", "part_text_object",
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]), "messages[0].content[0].text"),
    ("/v1/chat/completions", "part_unknown", chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
     "messages[0].content"),
    ("/v1/chat/completions", "tool_calls_string",
     chat(messages=[{"role": "assistant", "content": "x", "tool_calls": "call"}]), "messages[0].tool_calls"),
    ("/v1/chat/completions", "tool_call_not_object",
     chat(messages=[{"role": "assistant", "content": "x", "tool_calls": ["call"]}]), "messages[0].tool_calls[0]"),
    ("/v1/chat/completions", "tools_not_objects", chat(tools=["x"]), "tools"),
    ("/v1/chat/completions", "tool_without_name", chat(tools=[{"type": "function"}]), "tools"),
    ("/v1/chat/completions", "tool_choice_unknown",
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    ("/v1/chat/completions", "response_format", chat(response_format={"type": "nope"}), "response_format"),
    ("/v1/chat/completions", "json_schema", chat(json_schema={"type": "nope"}), "json_schema"),
    ("/v1/chat/completions", "regex", chat(regex_pattern="(((("), "regex_pattern"),
    ("/v1/chat/completions", "grammar", chat(grammar_string="root ::= ("), "grammar_string"),
    ("/v1/chat/completions", "logit_bias_key", chat(logit_bias={"abc": 1}), "logit_bias"),
    ("/v1/chat/completions", "logit_bias_id", chat(logit_bias={"99999999": 1}), "logit_bias"),
    ("/v1/chat/completions", "logit_bias_negative_id", chat(logit_bias={"-5": 1}), "logit_bias"),
    ("/v1/chat/completions", "logit_bias_value", chat(logit_bias={"5": 1e308}), "logit_bias"),
    ("/v1/chat/completions", "banned_tokens", chat(banned_tokens=[-7]), "banned_tokens"),
    ("/v1/chat/completions", "allowed_tokens", chat(allowed_tokens=[2**40]), "allowed_tokens"),
    ("/v1/chat/completions", "stop_token_ids", chat(stop_token_ids=[-1]), "stop_token_ids"),
    ("/v1/chat/completions", "stream_options", chat(stream_options={"include_usage": "x"}),
     "stream_options.include_usage"),
    ("/v1/chat/completions", "reasoning_effort", chat(reasoning_effort="extreme"), "reasoning_effort"),
    ("/v1/chat/completions", "continue_final", chat(continue_final_message=True), "continue_final_message"),
    # OpenAI completions
    ("/v1/completions", "no_prompt", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", "empty_prompt_list", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", "token_out_of_vocab", {"prompt": [2**40], "max_tokens": 2}, "prompt"),
    ("/v1/completions", "negative_token", {"prompt": [-1], "max_tokens": 2}, "prompt"),
    ("/v1/completions", "prompt_mixed", {"prompt": [1, "a", {"b": 2}], "max_tokens": 2}, "prompt"),
    ("/v1/completions", "logprobs", {"prompt": "Hi", "max_tokens": 2, "logprobs": 99}, "logprobs"),
    ("/v1/completions", "best_of", {"prompt": "Hi", "max_tokens": 2, "best_of": 0}, "best_of"),
    ("/v1/completions", "suffix_no_fim", {"prompt": "Hi", "max_tokens": 2, "suffix": "x"}, "suffix"),
    ("/v1/token/encode", "nothing", {}, "text"),
    ("/v1/token/encode", "bad_messages", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/token/decode", "out_of_vocab", {"tokens": [2**40]}, "tokens"),
    # Kobold
    ("/api/v1/generate", "temperature", kobold(temperature=-5), "temperature"),
    ("/api/v1/generate", "top_k", kobold(top_k=-3), "top_k"),
    ("/api/v1/generate", "n", kobold(n=0), "n"),
    ("/api/v1/generate", "rep_pen", kobold(rep_pen=0), "rep_pen"),
    ("/api/v1/generate", "max_context_length", kobold(max_context_length=1), "max_context_length"),
    ("/api/v1/generate", "sampler_seed", kobold(sampler_seed=-2), "sampler_seed"),
    ("/api/v1/generate", "logit_bias_key", kobold(logit_bias={"x": 1}), "logit_bias"),
    ("/api/v1/generate", "logit_bias_value", kobold(logit_bias={"5": -1e308}), "logit_bias"),
    ("/api/v1/generate", "grammar", kobold(grammar="root ::= ("), "grammar"),
    ("/api/v1/generate", "stop_sequence", kobold(stop_sequence=[1, 2]), "stop_sequence"),
    ("/api/v1/generate", "genkey_long", kobold(genkey="k" * 500), "genkey"),
    ("/api/extra/generate/stream", "n", kobold(n=2), "n"),
    ("/api/extra/tokencount", "prompt_list", {"prompt": ["a"]}, "prompt"),
    ("/api/extra/detokenize", "out_of_vocab", {"ids": [2**40]}, "ids"),
    ("/api/extra/abort", "genkey_type", {"genkey": ["x"]}, "genkey"),
    # Ollama
    ("/api/chat", "temperature", ollama_chat(options={"temperature": -5, "num_predict": 2}), "options.temperature"),
    ("/api/chat", "top_p", ollama_chat(options={"top_p": 1e308, "num_predict": 2}), "options.top_p"),
    ("/api/chat", "mirostat", ollama_chat(options={"mirostat": 7, "num_predict": 2}), "options.mirostat"),
    ("/api/chat", "options_list", ollama_chat(options=[1]), "options"),
    ("/api/chat", "unknown_role", ollama_chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ("/api/chat", "no_role", ollama_chat(messages=[{"content": "x"}]), "messages[0].role"),
    ("/api/chat", "format", ollama_chat(format="xml"), "format"),
    ("/api/chat", "format_schema", ollama_chat(format={"type": 5}), "format"),
    ("/api/chat", "images", ollama_chat(messages=[{"role": "user", "content": "x", "images": ["aGk="]}]),
     "messages[0].images"),
    ("/api/chat", "no_model", {"messages": USER, "stream": False}, "model"),
    ("/api/chat", "unknown_model", ollama_chat(model="nope:7b"), "model"),
    ("/api/generate", "suffix", {"model": MODEL_NAME, "prompt": "a", "suffix": "b", "stream": False}, "suffix"),
    ("/api/generate", "context", {"model": MODEL_NAME, "prompt": "a", "context": "zz", "stream": False}, "context"),
    ("/api/generate", "raw_type", {"model": MODEL_NAME, "prompt": "a", "raw": "very", "stream": False}, "raw"),
    ("/api/embed", "no_backend", {"model": MODEL_NAME, "input": "x"}, "embeddings"),
    # llama.cpp
    ("/infill", "no_fim", {"input_prefix": "a", "input_suffix": "b", "n_predict": 2}, "input_suffix"),
    ("/infill", "n_predict_zero", {"input_prefix": "a", "n_predict": 0}, "n_predict"),
    ("/tokenize", "no_content", {}, "content"),
    ("/detokenize", "out_of_vocab", {"tokens": [49152]}, "tokens"),
    ("/completion", "no_prompt", {"n_predict": 2}, "prompt"),
    ("/completion", "prompt_object", {"prompt": {"prompt_string": "a"}, "n_predict": 2}, "prompt"),
    ("/completion", "token_out_of_vocab", {"prompt": [49152], "n_predict": 2}, "prompt"),
    ("/completion", "temperature_type", {"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ("/completion", "logit_bias_shape", {"prompt": "Hi", "logit_bias": [[1, 2, 3]]}, "logit_bias"),
    ("/completion", "samplers_type", {"prompt": "Hi", "samplers": [1, 2]}, "samplers"),
    ("/completion", "grammar", {"prompt": "Hi", "grammar": "root ::= ("}, "grammar"),
    ("/completion", "json_schema", {"prompt": "Hi", "json_schema": {"type": "nope"}}, "json_schema"),
    ("/completion", "n_probs_negative", {"prompt": "Hi", "n_probs": -1}, "n_probs"),
    ("/completion", "stream_many", {"prompt": ["a", "b"], "stream": True}, "prompt"),
    # Admin
    ("/v1/sampling/override/switch", "nothing", {}, "preset"),
    ("/v1/sampling/override/switch", "override_type", {"overrides": {"temperature": "hot"}}, "temperature"),
    ("/v1/sampling/override/switch", "override_unknown", {"overrides": {"nonsense": 1}}, "nonsense"),
    ("/v1/sampling/override/switch", "override_bias", {"overrides": {"logit_bias": {"5": 1e308}}}, "logit_bias"),
    ("/v1/sampling/override/switch", "override_force", {"overrides": {"stop": {"override": ["x"], "force": "y"}}},
     "force"),
    ("/v1/model/load", "no_name", {}, "model_name"),
    ("/v1/model/load", "max_seq_len_huge", {"model_name": MODEL_NAME, "max_seq_len": 2**40}, "max_seq_len"),
    ("/v1/model/load", "cache_mode", {"model_name": MODEL_NAME, "cache_mode": "Q1"}, "cache_mode"),
    ("/v1/model/load", "template_injection", {"model_name": MODEL_NAME, "prompt_template": INJECTION},
     "prompt_template"),
    ("/v1/template/switch", "injection_include", {"prompt_template_name": "{% include '/etc/passwd' %}"},
     "template"),
    ("/v1/template/switch", "injection_expression", {"prompt_template_name": "{{ cycler.__init__.__globals__ }}"},
     "template"),
]
ADMIN_PATHS = {"/v1/model/load", "/v1/template/switch", "/v1/sampling/override/switch", "/api/pull"}


@pytest.mark.parametrize(("path", "body", "expected"), [(p, b, e) for p, _, b, e in FIELD_CASES],
                         ids=[f"{p}-{name}" for p, name, _, _ in FIELD_CASES])
def test_field_errors_name_the_field(app_env: tuple[TestClient, Keys], path: str, body: dict[str, Any],
                                     expected: str) -> None:
    client, keys = app_env
    from endpoints.http.deps import dialect_at

    r = client.post(path, json=body, headers=headers(keys, admin=path in ADMIN_PATHS))
    text = error_text(r, dialect_at(client.app, "POST", path).dialect)
    assert expected in text, text


NAME_FIELDS = [
    ("/v1/chat/completions", chat(), ("model",), "model"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, ("model",), "model"),
    ("/v1/token/encode", {"text": "Hi"}, ("model",), "model"),
    ("/tokenize", {"content": "Hi"}, ("model",), "model"),
    ("/infill", {"input_prefix": "a"}, ("model",), "model"),
    ("/completion", {"prompt": "a", "n_predict": 1}, ("model",), "model"),
    ("/v1/model/load", {}, ("model_name",), "model"),
    ("/v1/model/load", {"model_name": MODEL_NAME}, ("prompt_template",), "template"),
    ("/v1/model/unload", {}, ("model_name",), "model"),
    ("/v1/template/switch", {}, ("prompt_template_name",), "template"),
    ("/v1/sampling/override/switch", {}, ("preset",), "preset"),
    ("/api/chat", ollama_chat(), ("model",), "model"),
    ("/api/generate", {"prompt": "Hi", "stream": False}, ("model",), "model"),
    ("/api/show", {}, ("model",), "model"),
    ("/api/pull", {"stream": False}, ("model",), "model"),
]


@pytest.mark.parametrize(("path", "body", "name_field", "expected"), NAME_FIELDS,
                         ids=[f"{p}-{f[0]}" for p, _, f, _ in NAME_FIELDS])
def test_path_traversal_in_every_name_field(app_env: tuple[TestClient, Keys], path: str, body: dict[str, Any],
                                            name_field: tuple[str], expected: str) -> None:
    client, keys = app_env
    from endpoints.http.deps import dialect_at

    admin = path in ADMIN_PATHS or path == "/v1/model/unload"
    dialect = dialect_at(client.app, "POST", path).dialect
    for name in TRAVERSALS:
        r = client.post(path, json=with_value(body, name_field, name), headers=headers(keys, admin=admin))
        assert expected in error_text(r, dialect).lower(), (name, r.text)


def test_download_names_stay_inside_the_model_directory(tmp_path: Any) -> None:
    """repo_id and folder_name (used by downloads) refuse paths before anything touches the disk."""
    from common.downloads.transfer import DownloadRequest, check_repo_id, target_folder
    from common.errors import BadRequestError

    for name in TRAVERSALS + ["a/b/c", ".hidden/x"]:
        with pytest.raises(BadRequestError) as exc:
            check_repo_id(name)
        assert exc.value.param == "repo_id"
    for folder in TRAVERSALS:
        with pytest.raises(BadRequestError) as exc:
            target_folder(tmp_path, DownloadRequest(repo_id="owner/repo", folder_name=folder))
        assert "folder" in (exc.value.param or "")
    assert target_folder(tmp_path, DownloadRequest(repo_id="owner/repo")) == tmp_path / "repo"


# -- content is data ------------------------------------------------------------------------------
def test_template_injection_in_content_is_data(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    messages = [{"role": "system", "content": INJECTION}, {"role": "user", "content": "{% raw %}" + INJECTION}]
    enc = client.post("/v1/token/encode", json={"messages": messages}, headers=headers(keys))
    assert enc.status_code == 200, enc.text
    text = client.post("/v1/token/decode", json={"tokens": enc.json()["tokens"]}, headers=headers(keys)).json()["text"]
    assert text.count(INJECTION) == 2 and "{% raw %}" in text and "root:" not in text
    r = client.post("/v1/chat/completions", json=chat(messages=messages), headers=headers(keys))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    r = client.post("/api/chat", json=ollama_chat(messages=messages, options={"num_predict": 2}),
                    headers=headers(keys))
    assert r.status_code == 200 and r.json()["done"] is True


def test_enormous_prompts_are_a_clean_context_error(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    huge = "hello world " * (5_000_000 // 12)  # 5 MB
    r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": huge}]),
                    headers=headers(keys))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages" and "maximum context length" in r.json()["error"]["message"]
    assert "characters" in r.json()["error"]["message"]  # refused by length, before tokenizing megabytes
    big = huge[:1_000_000]
    r = client.post("/api/generate", json={"model": MODEL_NAME, "prompt": big, "stream": False}, headers=headers(keys))
    assert "maximum context length" in error_text(r, OLLAMA)
    # Kobold keeps KoboldCpp's semantics: the prompt is cut from the left to the client's budget.
    r = client.post("/api/v1/generate", json=kobold(prompt=big, max_context_length=24), headers=headers(keys))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["prompt_tokens"] <= 24


# -- keys ----------------------------------------------------------------------------------------
AUTH_ROUTES = [
    ("POST", "/v1/chat/completions", chat(), OPENAI, False),
    ("GET", "/v1/models", None, OPENAI, False),
    ("POST", "/tokenize", {"content": "Hi"}, LLAMACPP, False),
    ("GET", "/slots", None, LLAMACPP, False),
    ("POST", "/v1/model/load", {"model_name": "../never"}, OPENAI, True),
    ("POST", "/v1/template/switch", {"prompt_template_name": "../never"}, OPENAI, True),
    ("POST", "/v1/sampling/override/switch", {"preset": "../never"}, OPENAI, True),
    ("POST", "/api/v1/generate", kobold(), KOBOLD, False),
    ("GET", "/api/v1/model", None, KOBOLD, False),
    ("POST", "/api/extra/abort", {"genkey": "x"}, KOBOLD, False),
    ("POST", "/api/chat", ollama_chat(options={"num_predict": 2}), OLLAMA, False),
    ("GET", "/api/tags", None, OLLAMA, False),
    ("POST", "/api/pull", {"model": "../never"}, OLLAMA, True),
    ("POST", "/v1/messages/count_tokens", {"model": MODEL_NAME, "messages": USER}, ANTHROPIC, False),
]


@pytest.mark.parametrize(("method", "path", "body", "dialect", "admin"), AUTH_ROUTES,
                         ids=[f"{m} {p}" for m, p, *_ in AUTH_ROUTES])
def test_missing_wrong_and_insufficient_keys(app_env: tuple[TestClient, Keys], method: str, path: str,
                                             body: Any, dialect: Dialect, admin: bool) -> None:
    client, keys = app_env
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": b"\xc3\xa9\xff"}, {"Authorization": "Basic x"}):
        r = client.request(method, path, json=body, headers=bad)
        assert r.status_code == 401, (bad, r.text)
        text = error_text(r, dialect).lower()
        assert "key" in text
    r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {keys.api}"})
    if admin:
        assert r.status_code == 403 and "admin" in error_text(r, dialect).lower()
    else:
        assert r.status_code < 400, r.text
        r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {keys.admin}"})
        assert r.status_code < 400, r.text  # the admin key also works where an API key is needed


def test_unknown_routes_answer_in_shape(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    for path, dialect in (("/v1/embeddingz", OPENAI), ("/v1/nothing", OPENAI), ("/v1/lora", OPENAI),
                          ("/api/extra/nothing", KOBOLD), ("/api/nothing", OLLAMA),
                          ("/v1/messages/batches", ANTHROPIC)):
        r = client.post(path, json={}, headers=headers(keys, admin=True))
        assert r.status_code == 404 and path in error_text(r, dialect)
    r = client.delete("/v1/chat/completions", headers=headers(keys))
    assert r.status_code == 405 and "DELETE" in error_text(r, OPENAI)


def test_constraints_that_leave_nothing_to_sample_end_only_that_request(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    # Visible in the request itself: refused before it starts, naming the field.
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "allowed_tokens": [5],
                                             "banned_tokens": [5, 6]}, headers=headers(keys))
    assert "allowed_tokens" in error_text(r, OPENAI)
    # Visible only while sampling: the end of turn is the one token allowed, and min_tokens forbids ending.
    body = {"prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "allowed_tokens": [2]}
    r = client.post("/v1/completions", json=body, headers=headers(keys))
    assert r.status_code == 400 and r.json()["error"]["code"] == "nothing_to_sample"
    assert "min_tokens" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=headers(keys)) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "nothing is left to sample" in json.loads(data[-2])["error"]["message"]
    # The engine serves on, for everyone.
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers(keys))
    assert r.status_code == 200
    assert client.get("/health").json()["models"][MODEL_NAME]["state"] == "loaded"


# -- still serving -------------------------------------------------------------------------------
def test_still_serving_after_the_battery(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    r = client.post("/v1/chat/completions", json=chat(), headers=headers(keys))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    r = client.post("/api/v1/generate", json=kobold(), headers=headers(keys))
    assert r.status_code == 200 and isinstance(r.json()["results"][0]["text"], str)
    r = client.post("/api/generate", json={"model": MODEL_NAME, "prompt": "Hi", "stream": False,
                                           "options": {"num_predict": 2}}, headers=headers(keys))
    assert r.status_code == 200 and r.json()["done"] is True
    overrides = client.get("/v1/sampling/overrides", headers=headers(keys)).json()
    assert overrides["selected_preset"] is None  # no hostile switch took effect
    health = client.get("/health").json()
    assert health["status"] == "healthy"
    stats = health["models"][MODEL_NAME]
    assert stats["slots_active"] == 0 and stats["queue_depth"] == 0 and stats["kv_cells_used"] == 0
