"""Per-key rate limits through every dialect, with the real model in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_NAME, make_config, wait_loaded

DIALECTS = ("openai", "kobold", "ollama")
KEYS = {
    **{f"req-{d}": {"requests_per_minute": 1} for d in DIALECTS},
    **{f"tok-{d}": {"tokens_per_minute": 1} for d in DIALECTS},
    "tok-stream": {"tokens_per_minute": 1},
    "req-metrics": {"requests_per_minute": 1},
    "free": {"unlimited": True},
}
SIMPLE_API, ADMIN = "simple-api-key-000", "admin-key-000000"


def secret(name: str) -> str:
    return f"secret-{name}-0000"


@pytest.fixture(scope="module")
def limited(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("limits")
    lines = [f'api_key: "{SIMPLE_API}"', f'admin_key: "{ADMIN}"', "keys:"]
    for name, limits in KEYS.items():
        fields = ", ".join(f"{k}: {str(v).lower()}" for k, v in limits.items())
        lines.append(f'  - {{key: "{secret(name)}", name: {name}, {fields}}}')
    (tmp / "api_tokens.yml").write_text("\n".join(lines) + "\n")
    # The simple API key has no limits of its own: the default applies to it (not to the admin key).
    config = make_config(tmp, model_dir, limits={"default_requests_per_minute": 2})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        yield client


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def openai(c: TestClient, headers: dict[str, str], tokens: int = 3) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    return c.post("/v1/chat/completions", headers=headers, json=body)


def kobold(c: TestClient, headers: dict[str, str], tokens: int = 3) -> httpx.Response:
    body = {"prompt": "Count from one to ten: one, two,", "max_length": tokens, "temperature": 0.01,
            "use_default_badwordsids": True}
    return c.post("/api/v1/generate", headers=headers, json=body)


def ollama(c: TestClient, headers: dict[str, str], tokens: int = 3) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count from one to ten."}],
            "stream": False, "options": {"num_predict": tokens, "temperature": 0}}
    return c.post("/api/chat", headers=headers, json=body)


CALLS: dict[str, Callable[..., httpx.Response]] = {"openai": openai, "kobold": kobold, "ollama": ollama}


def error_text(dialect: str, r: httpx.Response) -> str:
    """The message of a refusal, checking the dialect's error shape on the way."""
    body: Any = r.json()
    if dialect == "openai":
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert body["error"]["type"] in ("requests", "tokens")
        return body["error"]["message"]
    if dialect == "kobold":
        assert body["detail"]["type"] == "rate_limit_exceeded"
        return body["detail"]["msg"]
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def assert_refused(dialect: str, r: httpx.Response, kind: str, name: str) -> int:
    assert r.status_code == 429, r.text
    retry = int(r.headers["retry-after"])
    assert retry >= 1
    text = error_text(dialect, r)
    assert f"'{name}'" in text and ("requests per minute" if kind == "requests" else "tokens per minute") in text
    assert "Retry in" in text
    if dialect == "openai":
        assert r.json()["error"]["type"] == kind
    return retry


@pytest.mark.parametrize("dialect", DIALECTS)
def test_request_limit_refuses_with_429_and_retry_after(limited: TestClient, dialect: str) -> None:
    call, name = CALLS[dialect], f"req-{dialect}"
    assert call(limited, bearer(name)).status_code == 200
    retry = assert_refused(dialect, call(limited, bearer(name)), "requests", name)
    assert retry <= 60  # one request a minute refills within the minute
    assert call(limited, bearer("free")).status_code == 200  # the unlimited key on the same server is served


@pytest.mark.parametrize("dialect", DIALECTS)
def test_token_limit_counts_generated_tokens(limited: TestClient, dialect: str) -> None:
    call, name = CALLS[dialect], f"tok-{dialect}"
    first = call(limited, bearer(name), tokens=4)  # admitted with a full budget, never cut short
    assert first.status_code == 200, first.text
    retry = assert_refused(dialect, call(limited, bearer(name)), "tokens", name)
    assert retry > 60  # 4 tokens generated against 1 per minute: the debt takes minutes to repay
    assert call(limited, bearer("free"), tokens=4).status_code == 200


def test_streamed_tokens_are_charged_when_the_stream_ends(limited: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 3,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with limited.stream("POST", "/v1/chat/completions", headers=bearer("tok-stream"), json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert_refused("openai", openai(limited, bearer("tok-stream")), "tokens", "tok-stream")


def test_unlimited_and_admin_keys_are_never_refused(limited: TestClient) -> None:
    for headers in (bearer("free"), {"X-Admin-Key": ADMIN}):
        for _ in range(3):
            assert openai(limited, headers, tokens=1).status_code == 200


def test_the_default_limit_applies_to_keys_without_their_own(limited: TestClient) -> None:
    headers = {"Authorization": f"Bearer {SIMPLE_API}"}
    assert openai(limited, headers, tokens=1).status_code == 200
    assert openai(limited, headers, tokens=1).status_code == 200
    assert_refused("openai", openai(limited, headers, tokens=1), "requests", "api")


def test_only_generations_count_against_the_limit(limited: TestClient) -> None:
    headers = bearer("req-metrics")
    for _ in range(3):
        assert limited.get("/v1/models", headers=headers).status_code == 200
        assert limited.post("/api/extra/tokencount", headers=headers, json={"prompt": "hi"}).status_code == 200
    # A client mistake is not a generation either: it does not spend the request.
    bad = limited.post("/v1/chat/completions", headers=headers, json={"messages": []})
    assert bad.status_code == 400
    assert openai(limited, headers, tokens=1).status_code == 200


def scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = client.get("/metrics", headers=bearer("free"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(series: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return series[name][tuple(sorted(labels.items()))]


def test_metrics_after_requests(limited: TestClient) -> None:
    before = scrape(limited)
    free = bearer("free")
    assert openai(limited, free, tokens=3).status_code == 200
    assert kobold(limited, free, tokens=3).status_code == 200
    r = ollama(limited, free, tokens=3)
    assert r.status_code == 200
    assert openai(limited, bearer("req-metrics"), tokens=1).status_code in (200, 429)
    assert openai(limited, bearer("req-metrics"), tokens=1).status_code == 429
    after = scrape(limited)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    assert grew("parley_http_requests_total", method="POST", route="/v1/chat/completions", status="200") >= 1
    assert grew("parley_http_requests_total", method="POST", route="/api/v1/generate", status="200") == 1
    assert grew("parley_http_requests_total", method="POST", route="/api/chat", status="200") == 1
    assert grew("parley_http_requests_total", method="POST", route="/v1/chat/completions", status="429") >= 1
    assert grew("parley_generated_tokens_total", model=MODEL_NAME) >= 3 + 3 + r.json()["eval_count"]
    assert grew("parley_prompt_tokens_total", model=MODEL_NAME) >= 3 * 10
    assert grew("parley_time_to_first_token_seconds_count", model=MODEL_NAME) >= 3
    assert grew("parley_inter_token_latency_seconds_count", model=MODEL_NAME) >= 3 * 2
    assert value(after, "parley_time_to_first_token_seconds_sum", model=MODEL_NAME) > 0
    assert grew("parley_rate_limit_refusals_total", key="req-metrics", limit="requests") >= 1
    assert grew("parley_generations_total", model=MODEL_NAME, finish_reason="length") >= 2
    # Scrape-time gauges: nothing runs between requests here.
    assert value(after, "parley_queue_depth", model=MODEL_NAME) == 0
    assert value(after, "parley_active_sequences", model=MODEL_NAME) == 0
    assert value(after, "parley_kv_cells_used", model=MODEL_NAME) == 0
    assert value(after, "parley_kv_cells_total", model=MODEL_NAME) >= 2048
    assert value(after, "parley_sequence_slots", model=MODEL_NAME) >= 1
    assert value(after, "parley_models_loaded") == 1
    assert value(after, "parley_generations_in_flight") == 0
    assert value(after, "parley_draining") == 0
    assert value(after, "parley_model_load_seconds_count", model=MODEL_NAME) == 1
    assert value(after, "parley_model_load_seconds_sum", model=MODEL_NAME) > 0


def test_metrics_need_a_key_by_default(limited: TestClient) -> None:
    r = limited.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_without_auth_the_default_limit_applies_per_client_address(model_dir: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, network={"disable_auth": True},
                         limits={"default_requests_per_minute": 1})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        assert openai(client, {}, tokens=1).status_code == 200
        assert_refused("openai", openai(client, {}, tokens=1), "requests", "testclient")  # the client's address
