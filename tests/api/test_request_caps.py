"""Per-request caps (output tokens, n, prompt tokens, body bytes) and the request log, in every dialect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from loguru import logger

from tests.conftest import MODEL_NAME, Keys, make_config, wait_loaded

CAP, MAX_N, MAX_PROMPT, MAX_BODY = 6, 2, 60, 4000
LONG = "Please repeat these words exactly. " * 12  # well over MAX_PROMPT tokens, far under the context


@pytest.fixture(scope="module")
def capped(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("caps")
    config = make_config(
        tmp, model_dir,
        limits={"max_output_tokens": CAP, "max_n": MAX_N, "max_prompt_tokens": MAX_PROMPT},
        network={"max_request_body_bytes": MAX_BODY},
        logging={"log_requests": True, "log_prompt": True, "log_prompt_chars": 40, "log_generation_params": True},
    )
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        client.headers.update(Keys(tmp / "api_tokens.yml").api_headers())
        yield client


def chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, **extra}


def kobold(**extra: Any) -> dict[str, Any]:
    return {"prompt": "Say hi.", "temperature": 0.01, **extra}


def ollama(**options: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "stream": False,
            "options": {"temperature": 0, **options}}


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --- output length ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_openai_asking_more_than_the_ceiling_is_a_400_naming_the_field(capped: TestClient, field: str) -> None:
    err = openai_error(capped.post("/v1/chat/completions", json=chat(**{field: CAP + 1})), 400)
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    assert f"at most {CAP} tokens" in err["message"] and f"max_tokens <= {CAP}" in err["message"]
    err = openai_error(capped.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 500}), 400)
    assert err["param"] == "max_tokens"


def test_openai_at_or_without_a_length_stays_within_the_ceiling(capped: TestClient) -> None:
    r = capped.post("/v1/chat/completions", json=chat(max_tokens=CAP, ignore_eos=True))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == CAP
    r = capped.post("/v1/chat/completions", json=chat(ignore_eos=True))  # no length: the ceiling applies
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == CAP
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_kobold_max_length_over_the_ceiling_is_a_400(capped: TestClient) -> None:
    r = capped.post("/api/v1/generate", json=kobold(max_length=CAP + 1))
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail["param"] == "max_length" and f"max_length <= {CAP}" in detail["msg"]
    r = capped.post("/api/v1/generate", json=kobold(use_default_badwordsids=True))  # no max_length
    assert r.status_code == 200 and r.json()["results"][0]["completion_tokens"] == CAP
    assert capped.get("/api/v1/config/max_length").json() == {"value": CAP}


def test_ollama_num_predict_over_the_ceiling_is_a_400(capped: TestClient) -> None:
    r = capped.post("/api/chat", json=ollama(num_predict=CAP + 1))
    assert r.status_code == 400 and "options.num_predict" in r.json()["error"]
    r = capped.post("/api/chat", json=ollama())  # no num_predict: until the model stops, at most the ceiling
    assert r.status_code == 200 and 0 < r.json()["eval_count"] <= CAP


# --- n -------------------------------------------------------------------------------------


def test_n_over_the_ceiling_is_a_400(capped: TestClient) -> None:
    err = openai_error(capped.post("/v1/chat/completions", json=chat(n=MAX_N + 1, max_tokens=2)), 400)
    assert err["param"] == "n" and f"at most {MAX_N} choices" in err["message"]
    r = capped.post("/api/v1/generate", json=kobold(n=MAX_N + 1, max_length=2))
    assert r.status_code == 400 and r.json()["detail"]["param"] == "n"
    r = capped.post("/v1/chat/completions", json=chat(n=MAX_N, max_tokens=2))
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N


# --- prompt size --------------------------------------------------------------------------------


def test_long_prompts_are_a_400_distinct_from_context_length(capped: TestClient) -> None:
    err = openai_error(capped.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": LONG}])),
                       400)
    assert err["param"] == "messages" and err["code"] == "prompt_too_long"
    assert f"at most {MAX_PROMPT}" in err["message"]
    err = openai_error(capped.post("/v1/completions", json={"prompt": LONG, "max_tokens": 2}), 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_long"
    r = capped.post("/api/v1/generate", json=kobold(prompt=LONG, max_length=2))
    assert r.status_code == 400 and r.json()["detail"] == {
        "msg": r.json()["detail"]["msg"], "type": "prompt_too_long", "param": "prompt",
    }
    r = capped.post("/api/chat", json={**ollama(num_predict=2), "messages": [{"role": "user", "content": LONG}]})
    assert r.status_code == 400 and "Shorten messages" in r.json()["error"]


# --- body size ----------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_in_each_dialect(capped: TestClient) -> None:
    big = chat(max_tokens=2, messages=[{"role": "user", "content": "x" * MAX_BODY}])
    err = openai_error(capped.post("/v1/chat/completions", json=big), 413)
    assert err["code"] == "payload_too_large" and f"{MAX_BODY} bytes" in err["message"]
    r = capped.post("/api/v1/generate", json=kobold(prompt="x" * MAX_BODY))
    assert r.status_code == 413 and r.json()["detail"]["type"] == "payload_too_large"
    r = capped.post("/api/chat", json={**ollama(), "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    assert r.status_code == 413 and "network.max_request_body_bytes" in r.json()["error"]


def test_chunked_bodies_are_counted_as_they_arrive(capped: TestClient) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(total // 100):
            yield b"y" * 100
        yield b'", "max_tokens": 2}'

    headers = {"Content-Type": "application/json"}
    r = capped.post("/v1/completions", content=chunks(MAX_BODY * 3), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    small = capped.post("/v1/completions", content=chunks(100), headers=headers)  # replayed to the route intact
    assert small.status_code == 200, small.text
    assert small.json()["usage"]["completion_tokens"] >= 1


# --- request log ---------------------------------------------------------------------------------------------


def test_request_log_line(capped: TestClient) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        r = capped.post("/v1/chat/completions", json=chat(max_tokens=3, ignore_eos=True, top_k=7))
        capped.post("/v1/chat/completions", json=chat(max_tokens=99))
    finally:
        logger.remove(sink)
    assert r.status_code == 200
    ok = next(line for line in lines if line.startswith("POST /v1/chat/completions -> 200"))
    assert "key api" in ok and f"model {MODEL_NAME}" in ok
    assert f"tokens {r.json()['usage']['prompt_tokens']} prompt + 3 completion" in ok
    assert "'top_k': 7" in ok and "'max_tokens': 3" in ok
    excerpt = ok.split("prompt '", 1)[1]
    assert excerpt.startswith("<|im_start|>") and "... (" in excerpt  # cut to log_prompt_chars
    refused = next(line for line in lines if line.startswith("POST /v1/chat/completions -> 400"))
    assert "key api" in refused
