"""Samplers, banned strings, min_tokens, logprobs and constrained output through the real model."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
from fastapi.testclient import TestClient

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def complete(client: TestClient, **body: object) -> dict:
    r = client.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, content: str, **body: object) -> dict:
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": content}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_top_k_1_equals_greedy(client: TestClient) -> None:
    prompt = "The three primary colors are"
    greedy = complete(client, prompt=prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    topk = complete(client, prompt=prompt, max_tokens=16, temperature=1.5, top_k=1, seed=3)["choices"][0]["text"]
    assert topk == greedy


def test_logit_bias_removes_a_token(client: TestClient) -> None:
    prompt = "The capital of France is"
    first = complete(client, prompt=prompt, max_tokens=1, temperature=0, logprobs=0)["choices"][0]
    token_id = client.post("/v1/token/encode", json={"text": first["text"], "add_bos_token": False}).json()["tokens"][0]
    biased = complete(client, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(token_id): -100})
    assert biased["choices"][0]["text"] != first["text"]


def test_banned_strings_never_appear(client: TestClient) -> None:
    prompt = "Write one sentence about the ocean and the sea."
    plain = [chat(client, prompt, temperature=1.0, seed=s, max_tokens=40)["choices"][0]["message"]["content"]
             for s in range(6)]
    assert any("sea" in t for t in plain), plain  # the ban below has something to prevent
    for seed in range(20):
        text = chat(client, prompt, temperature=1.0, seed=seed, max_tokens=40,
                    banned_strings=["sea", "ocean"])["choices"][0]["message"]["content"]
        assert "sea" not in text and "ocean" not in text, text


def test_banned_strings_ignore_case(client: TestClient) -> None:
    # As in exllamav2/v3 and KoboldCpp, banning "paris" bans "Paris" too.
    question = "What is the capital of France? Answer in one sentence."
    plain = chat(client, question, temperature=0, max_tokens=30)["choices"][0]["message"]["content"]
    assert "Paris" in plain, plain  # the model says it unasked: the ban has something to prevent
    banned = chat(client, question, temperature=0, max_tokens=30, banned_strings=["paris"])
    text = banned["choices"][0]["message"]["content"]
    assert "paris" not in text.lower() and text.strip(), text
    # Kobold's banned_tokens are the same bans (KoboldCpp lowercases both sides too).
    body = {"prompt": "The Eiffel Tower is in the city of", "max_length": 12, "temperature": 0}
    kobold = client.post("/api/v1/generate", json=body).json()["results"][0]["text"]
    assert "Paris" in kobold, kobold
    kobold = client.post("/api/v1/generate", json={**body, "banned_tokens": ["PARIS"]}).json()["results"][0]["text"]
    assert "paris" not in kobold.lower(), kobold


def test_min_tokens_suppresses_early_eos(client: TestClient) -> None:
    short = chat(client, "Reply with just the word yes.", temperature=0, max_tokens=80)
    assert short["choices"][0]["finish_reason"] == "stop"
    n = short["usage"]["completion_tokens"]
    longer = chat(client, "Reply with just the word yes.", temperature=0, max_tokens=80, min_tokens=n + 10)
    assert longer["usage"]["completion_tokens"] >= n + 10


def test_logprobs_chat_and_completion_shapes(client: TestClient) -> None:
    body = chat(client, "Say hello.", temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] or len(content) == body["usage"]["completion_tokens"] - 1
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert item["logprob"] >= item["top_logprobs"][0]["logprob"] - 1e-4
    assert "".join(i["token"] for i in content) == body["choices"][0]["message"]["content"]
    comp = complete(client, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(comp["tokens"]) == len(comp["token_logprobs"]) == len(comp["top_logprobs"]) == 4
    assert comp["text_offset"][0] == 0
    with client.stream("POST", COMPLETIONS, json={"prompt": "One, two,", "max_tokens": 4, "temperature": 0,
                                                   "logprobs": 2, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == comp["tokens"]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
     "required": ["color", "size"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "admin": {"type": "boolean"}}, "required": ["id", "admin"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 10}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]
REGEXES = [r"[a-z]{3,8}", r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}", r"0x[0-9a-f]{1,8}",
           r"\d{1,4}(\.\d{1,2})?", r"[a-z]{1,8}@[a-z]{2,8}\.(com|org)", r"(\d{1,3}\.){3}\d{1,3}", r"#[0-9A-F]{6}",
           r"\d{2}/\d{2}/\d{4}"]
GRAMMARS = [
    ('root ::= "yes" | "no" | [0-9]{1,3}', r"yes|no|[0-9]{1,3}"),
    ('root ::= "[" word (", " word){0,3} "]"\nword ::= [a-z]{1,6}', r"\[[a-z]{1,6}(, [a-z]{1,6}){0,3}\]"),
    ('start: pair ("\\n" pair){0,2}\npair: /[a-z]{1,6}/ "=" /[0-9]{1,4}/', r"[a-z]{1,6}=[0-9]{1,4}(\n[a-z]{1,6}=[0-9]{1,4}){0,2}"),
]


def test_constrained_output_always_validates_under_mixed_batches(client: TestClient) -> None:
    jobs: list[tuple[str, dict, object]] = []
    for i, schema in enumerate(SCHEMAS):
        jobs.append(("schema", {"json_schema": schema, "seed": i}, schema))
    for i, regex in enumerate(REGEXES):
        jobs.append(("regex", {"regex_pattern": regex, "seed": 100 + i}, regex))
    for i, (grammar, pattern) in enumerate(GRAMMARS):
        jobs.append(("grammar", {"grammar_string": grammar, "seed": 200 + i}, pattern))
    jobs.append(("json_object", {"response_format": {"type": "json_object"}, "seed": 300}, None))
    jobs.append(("json_schema_rf", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMAS[2], "strict": True}}, "seed": 301}, SCHEMAS[2]))
    unconstrained = [("free", {"seed": 400 + i}, None) for i in range(6)]

    def run(job: tuple[str, dict, object]) -> tuple[str, str, object, str]:
        kind, extra, check = job
        body = chat(client, "Give me an example value.", temperature=1.0, max_tokens=120, **extra)
        return kind, body["choices"][0]["message"]["content"], check, body["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs + unconstrained))
    failures = []
    for kind, text, check, finish in results:
        try:
            if kind in ("schema", "json_schema_rf"):
                jsonschema.validate(json.loads(text), check)  # type: ignore[arg-type]
            elif kind in ("regex", "grammar"):
                pattern = str(check).replace(r"\d", "[0-9]")
                assert re.fullmatch(pattern, text), (pattern, text)
            elif kind == "json_object":
                # Any object is allowed, so nothing bounds its size: only a finished one must parse.
                if finish == "stop":
                    assert isinstance(json.loads(text), dict)
                continue
            if kind != "free":
                assert finish == "stop", finish
        except Exception as exc:  # collect, then report all at once
            failures.append((kind, text, repr(exc)))
    assert not failures, failures


def test_invalid_constraints_are_400_naming_the_field(client: TestClient) -> None:
    for body, param in (({"json_schema": {"type": "nonsense"}}, "json_schema"),
                        ({"regex_pattern": "(unclosed"}, "regex_pattern"),
                        ({"grammar_string": "root ::= ("}, "grammar_string"),
                        ({"response_format": {"type": "xml"}}, "response_format")):
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].startswith(param)


def test_presets_override_force_and_unknown(client: TestClient) -> None:
    listing = client.get("/v1/sampling/overrides").json()
    assert "precise" in listing["presets"] and listing["selected_preset"] is None
    r = client.post("/v1/sampling/override/switch", json={"preset": "no-such-preset"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preset"
    try:
        r = client.post("/v1/sampling/override/switch", json={"overrides": {
            "temperature": {"override": 0.0, "force": True}, "stop": {"override": [" 4"], "additive": True}}})
        assert r.status_code == 200, r.text
        base = {"prompt": "1, 2, 3,", "max_tokens": 12, "temperature": 1.5, "seed": 5, "stop": [" 9"]}
        complete(client, **base)  # warm the prompt's cache (see test_same_seed_same_text)
        forced = complete(client, **base)["choices"][0]["text"]
        greedy = complete(client, **{**base, "temperature": 0})["choices"][0]["text"]
        assert forced == greedy  # forced temperature 0 beats the request's 1.5
        assert " 4" not in forced  # the preset's stop string was added to the request's
    finally:
        client.post("/v1/sampling/override/unload")
    assert client.get("/v1/sampling/overrides").json()["selected_preset"] is None
