"""llama.cpp's native /completion and /slots through the real SmolLM2 model, in-process.

There is no llama-server here, so the field sets are those PROTOCOLS.md
("llama.cpp native") records from llama-server's answers.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME, Keys
from tests.neartie import assert_agree, steps_from_entries

COMPLETION = "/completion"
CAPITAL = "The capital of France is"
CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "What is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n")
# Fields of llama-server's result that clients read, and of each streamed frame.
RESULT_FIELDS = {"content", "stop", "stop_type", "stopping_word", "timings", "tokens_predicted", "tokens_evaluated",
                 "tokens_cached", "generation_settings", "model", "prompt", "id_slot", "index", "tokens",
                 "has_new_line", "truncated"}
FRAME_FIELDS = {"content", "stop", "id_slot", "index", "tokens", "tokens_predicted", "tokens_evaluated"}
TIMINGS = {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
           "predicted_per_token_ms", "predicted_per_second", "cache_n"}
SETTINGS = {"n_ctx", "model", "seed", "temperature", "dynatemp_range", "dynatemp_exponent", "top_k", "top_p",
            "min_p", "typical_p", "repeat_last_n", "repeat_penalty", "presence_penalty", "frequency_penalty",
            "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
            "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta", "stop", "n_predict",
            "ignore_eos", "n_probs", "samplers", "logit_bias", "grammar", "stream"}


def sillytavern_body(prompt: str, *, stream: bool) -> dict[str, Any]:
    """What SillyTavern's Text Completion (type llama.cpp) posts to /completion, field for field:
    its shared text-generation fields, the llama.cpp ones, and the ones meant for other backends."""
    return {
        "prompt": prompt, "model": MODEL_NAME, "max_new_tokens": 24, "max_tokens": 24, "logprobs": 10,
        "temperature": 0.7, "top_p": 0.9, "typical_p": 1, "typical": 1, "min_p": 0.05,
        "repetition_penalty": 1.1, "frequency_penalty": 0.1, "presence_penalty": 0.1, "top_k": 40, "skew": 0,
        "min_tokens": 0, "add_bos_token": True, "dynamic_temperature": True, "dynatemp_low": 0.5,
        "dynatemp_high": 0.9, "dynatemp_range": 0.2, "dynatemp_exponent": 1, "smoothing_factor": 0,
        "smoothing_curve": 1, "dry_allowed_length": 2, "dry_multiplier": 0.8, "dry_base": 1.75,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"], "dry_penalty_last_n": 0 + 512, "max_tokens_second": 0,
        "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
        "stopping_strings": ["\nUser:"], "stop": ["\nUser:"], "truncation_length": 2048, "ban_eos_token": False,
        "skip_special_tokens": True, "include_reasoning": True, "top_a": 0, "tfs": 1, "mirostat_mode": 0,
        "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "", "banned_strings": [],
        "api_type": "llamacpp", "api_server": "http://127.0.0.1:5000", "xtc_threshold": 0.1,
        "xtc_probability": 0, "nsigma": 0, "top_n_sigma": 0, "min_keep": 0, "rep_pen": 1.1, "rep_pen_range": 64,
        "repetition_penalty_range": 64, "guidance_scale": 1, "negative_prompt": "", "seed": 1234,
        "repeat_penalty": 1.1, "repeat_last_n": 64, "n_predict": 24, "num_predict": 24, "num_ctx": 2048,
        "mirostat": 0, "ignore_eos": False, "n_probs": 10, "rep_pen_slope": 1, "n": 1,
        "logit_bias": [[49152 - 1, -2], [0, False]], "grammar": "", "cache_prompt": True, "stream": stream,
    }


def sse_frames(response: Any) -> list[dict[str, Any]]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "data: [DONE]" not in lines, lines[-3:]
    return [json.loads(line[len("data: "):]) for line in lines]


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post(COMPLETION, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_sillytavern_request_not_streamed(client: TestClient) -> None:
    body = complete(client, **sillytavern_body(CHATML_PROMPT, stream=False))
    assert RESULT_FIELDS | {"completion_probabilities"} <= set(body)
    assert body["content"].strip() and body["stop"] is True and body["stop_type"] in ("eos", "limit", "word")
    assert 0 < body["tokens_predicted"] <= 24 and body["tokens_evaluated"] > 20
    assert TIMINGS <= set(body["timings"]) and body["timings"]["predicted_n"] == body["tokens_predicted"]
    settings = body["generation_settings"]
    assert SETTINGS <= set(settings)
    assert settings["seed"] == 1234 and settings["n_predict"] == 24 and settings["dry_multiplier"] == 0.8
    assert settings["repeat_penalty"] == 1.1 and settings["repeat_last_n"] == 64
    assert settings["dynatemp_range"] > 0 and settings["samplers"][-1] == "temperature"  # temperature last
    assert {"bias": None, "token": 0} in settings["logit_bias"]  # false bans the token
    probs = body["completion_probabilities"]
    assert body["tokens_predicted"] - len(probs) == (body["stop_type"] == "eos")  # EOS brings no text, no entry
    assert all(len(p["top_logprobs"]) == 10 for p in probs)


def test_sillytavern_request_streamed(client: TestClient) -> None:
    with client.stream("POST", COMPLETION, json=sillytavern_body(CHATML_PROMPT, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = sse_frames(r)
    pieces, last = frames[:-1], frames[-1]
    assert pieces and all(FRAME_FIELDS <= set(f) and f["stop"] is False for f in pieces)
    assert all(f["completion_probabilities"] and len(f["completion_probabilities"][0]["top_logprobs"]) == 10
               for f in pieces)
    assert RESULT_FIELDS <= set(last) and last["stop"] is True and last["content"] == ""
    assert "".join(f["content"] for f in pieces).strip()
    listed = sum(len(f["completion_probabilities"]) for f in pieces)
    assert last["tokens_predicted"] - listed == (last["stop_type"] == "eos")  # EOS brings no text, no entry


def test_streamed_text_equals_the_unstreamed_text(client: TestClient) -> None:
    request = {"prompt": CHATML_PROMPT, "n_predict": 24, "temperature": 0}
    whole = complete(client, **request)
    with client.stream("POST", COMPLETION, json={**request, "stream": True}) as r:
        frames = sse_frames(r)
    assert "".join(f["content"] for f in frames[:-1]) == whole["content"]
    assert frames[-1]["stop_type"] == whole["stop_type"]
    assert frames[-1]["tokens_predicted"] == whole["tokens_predicted"]


def test_stop_types_word_limit_and_eos(client: TestClient) -> None:
    word = complete(client, prompt=CAPITAL, n_predict=8, temperature=0, stop=["."])
    assert (word["content"], word["stop_type"], word["stopping_word"]) == (" Paris", "word", ".")
    limit = complete(client, prompt=CAPITAL, n_predict=3, temperature=0)
    assert (limit["stop_type"], limit["stopping_word"], limit["tokens_predicted"]) == ("limit", "", 3)
    eos = complete(client, prompt="Is Paris in France? Answer yes or no: ", n_predict=8, temperature=0,
                   grammar='root ::= "yes" | "no"')
    assert eos["content"] in ("yes", "no") and eos["stop_type"] == "eos" and eos["stopping_word"] == ""


def test_grammar_and_json_schema_constrain(client: TestClient) -> None:
    body = complete(client, prompt="Three colours: ", n_predict=12, temperature=0.7, seed=7,
                    grammar='root ::= ("red" | "green" | "blue") (", " ("red" | "green" | "blue")){2}')
    parts = body["content"].split(", ")
    assert len(parts) == 3 and set(parts) <= {"red", "green", "blue"}, body["content"]
    assert body["generation_settings"]["grammar"].startswith("root ::=")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    body = complete(client, prompt=CHATML_PROMPT, n_predict=40, temperature=0, json_schema=schema)
    assert isinstance(json.loads(body["content"])["city"], str), body["content"]


def test_n_probs_shape(client: TestClient) -> None:
    body = complete(client, prompt=CAPITAL, n_predict=4, temperature=0, n_probs=3)
    for entry in body["completion_probabilities"]:
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert bytes(entry["bytes"]).decode() == entry["token"] and entry["logprob"] <= 0
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"id", "token", "bytes", "logprob"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == entry["id"]  # greedy: the chosen token is the best candidate
    post = complete(client, prompt=CAPITAL, n_predict=2, temperature=0, n_probs=2, post_sampling_probs=True)
    entry = post["completion_probabilities"][0]
    assert set(entry) == {"id", "token", "bytes", "prob", "top_probs"} and 0 < entry["prob"] <= 1
    assert "completion_probabilities" not in complete(client, prompt=CAPITAL, n_predict=2, temperature=0)


def test_token_id_and_mixed_prompts(client: TestClient) -> None:
    ids = client.post("/tokenize", json={"content": CAPITAL, "add_special": True}).json()["tokens"]
    tail = client.post("/tokenize", json={"content": " France is"}).json()["tokens"]
    text = complete(client, prompt=CAPITAL, n_predict=6, temperature=0, n_probs=2)
    by_ids = complete(client, prompt=ids, n_predict=6, temperature=0, n_probs=2)
    mixed = complete(client, prompt=["The capital of", *tail], n_predict=6, temperature=0, n_probs=2)
    for other in (by_ids, mixed):
        assert other["tokens_evaluated"] == text["tokens_evaluated"] == len(ids)
        assert_agree(steps_from_entries(text["completion_probabilities"]),
                     steps_from_entries(other["completion_probabilities"]))
    assert by_ids["prompt"].endswith(CAPITAL)  # token prompts are echoed as their text
    several = client.post(COMPLETION, json={"prompt": ["One, two,", "Red, green,"], "n_predict": 2,
                                            "temperature": 0}).json()
    assert [(r["index"], r["prompt"]) for r in several] == [(0, "One, two,"), (1, "Red, green,")]


def test_n_predict_zero_and_minus_one(client: TestClient) -> None:
    only = complete(client, prompt=CAPITAL, n_predict=0)
    assert (only["content"], only["tokens_predicted"], only["stop_type"]) == ("", 0, "limit")
    assert only["tokens_evaluated"] > 0 and only["timings"]["predicted_n"] == 0
    free = complete(client, prompt=CAPITAL, n_predict=-1, temperature=0, stop=["."])
    assert free["stop_type"] == "word" and free["generation_settings"]["n_predict"] > 1000  # the context's room


def test_bad_fields_are_400s_naming_them(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    auth = {"Authorization": f"Bearer {keys.api}"}
    for body, param in (({"prompt": "Hi", "n_predict": "abc"}, "n_predict"),
                        ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
                        ({"prompt": "Hi", "n_predict": -5}, "n_predict"),
                        ({"prompt": "Hi", "grammar": "root ::= ("}, "grammar"),
                        ({"prompt": "Hi", "json_schema": {"type": 5}}, "json_schema"),
                        ({"prompt": "Hi", "logit_bias": [[1, "x"]]}, "logit_bias"),
                        ({"prompt": [2**40]}, "prompt"), ({}, "prompt")):
        r = client.post(COMPLETION, json=body, headers=auth)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == 400 and error["type"] == "invalid_request_error", error
        assert param in error["message"] and error["param"].startswith(param), error


def test_completions_alias_and_the_openai_route_stay_apart(client: TestClient) -> None:
    alias = client.post("/completions", json={"prompt": CAPITAL, "n_predict": 2, "temperature": 0}).json()
    assert alias["stop"] is True and "content" in alias
    openai = client.post("/v1/completions", json={"prompt": CAPITAL, "max_tokens": 2, "temperature": 0}).json()
    assert openai["object"] == "text_completion" and "content" not in openai


def test_slots_shape_and_auth(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    r = client.get("/slots", headers={"Authorization": "Bearer not-a-key"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.get("/slots", headers={"Authorization": f"Bearer {keys.api}"})
    assert r.status_code == 200, r.text
    slots = r.json()
    assert slots and [s["id"] for s in slots] == list(range(len(slots)))
    for slot in slots:
        assert {"id", "id_task", "n_ctx", "speculative", "is_processing", "params", "next_token"} <= set(slot)
        assert slot["n_ctx"] == 2048 and slot["is_processing"] is False  # nothing runs between requests
        assert SETTINGS <= set(slot["params"]) and "prompt" not in slot
        assert {"has_next_token", "has_new_line", "n_remain", "n_decoded"} <= set(slot["next_token"][0])
    health = client.get("/health").json()["models"][MODEL_NAME]
    assert len(slots) == health["slots_total"]
