"""Embedding requests under the same rate limits and metrics as generations, with a real GGUF embedding model.

Each dialect's embedding route is admitted by the caller's request budget, charges the input tokens it read to
the token budget, is refused with a 429 and Retry-After in that dialect's error shape, and is counted in /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_rate_limits import error_text
from tests.conftest import make_config
from tests.embedding_models import EMBED_GGUF, make_embedding_models

ROUTES: dict[str, Callable[[TestClient, dict[str, str]], httpx.Response]] = {
    "openai": lambda c, h: c.post("/v1/embeddings", headers=h, json={"model": EMBED_GGUF, "input": "a cat"}),
    "ollama": lambda c, h: c.post("/api/embed", headers=h, json={"model": EMBED_GGUF, "input": "a cat"}),
    "ollama-legacy": lambda c, h: c.post("/api/embeddings", headers=h, json={"model": EMBED_GGUF, "prompt": "a cat"}),
    "kobold": lambda c, h: c.post("/api/extra/embeddings", headers=h, json={"input": "a cat"}),
}
KEYS = {
    **{f"req-{d}": "requests_per_minute: 2" for d in ROUTES},
    **{f"tok-{d}": "tokens_per_minute: 1" for d in ROUTES},
    "free": "unlimited: true",
}


def secret(name: str) -> str:
    return f"secret-{name}-0000"


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("embed-limits")
    models = make_embedding_models(tmp / "models", rerank=False)
    lines = ['api_key: "simple-api-key-000"', 'admin_key: "admin-key-000000"', "keys:"]
    lines += [f'  - {{key: "{secret(name)}", name: {name}, {limits}}}' for name, limits in KEYS.items()]
    (tmp / "api_tokens.yml").write_text("\n".join(lines) + "\n")
    config = make_config(tmp, models, model={"model_name": None}, embeddings={"embedding_model_name": EMBED_GGUF})
    with TestClient(create_app(config)) as c:
        deadline = time.monotonic() + 60
        while c.get("/v1/model/embedding", headers=bearer("free")).status_code != 200:
            assert time.monotonic() < deadline, "the embedding model did not load in time"
            time.sleep(0.05)
        yield c


def refusal_text(dialect: str, r: httpx.Response) -> str:
    """The 429's message, checking the dialect's error shape on the way."""
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    return error_text(dialect, r)


@pytest.mark.parametrize("dialect", list(ROUTES))
def test_request_limit_refuses_the_third_embedding_request(client: TestClient, dialect: str) -> None:
    call, name = ROUTES[dialect], f"req-{dialect}"
    assert call(client, bearer(name)).status_code == 200
    assert call(client, bearer(name)).status_code == 200
    text = refusal_text(dialect, call(client, bearer(name)))
    assert f"'{name}'" in text and "2 requests per minute" in text
    assert call(client, bearer("free")).status_code == 200  # an unlimited key on the same server is served


@pytest.mark.parametrize("dialect", list(ROUTES))
def test_embedded_input_tokens_count_against_the_token_limit(client: TestClient, dialect: str) -> None:
    call, name = ROUTES[dialect], f"tok-{dialect}"
    assert call(client, bearer(name)).status_code == 200  # a full budget admits it; it reads several tokens
    refused = call(client, bearer(name))
    text = refusal_text(dialect, refused)
    assert "tokens per minute" in text and int(refused.headers["retry-after"]) > 60  # a debt of several minutes


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics", headers=bearer("free"))
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_embedding_requests_and_tokens(client: TestClient) -> None:
    before = scrape(client)
    for call in ROUTES.values():
        assert call(client, bearer("free")).status_code == 200
    answers = [ROUTES["openai"](client, bearer("req-openai")).status_code for _ in range(3)]  # 2 a minute
    assert 429 in answers, answers
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("parley_embedding_requests_total", model=EMBED_GGUF) >= len(ROUTES)
    assert grew("parley_embedded_tokens_total", model=EMBED_GGUF) >= len(ROUTES) * 3  # [CLS] a cat [SEP]
    assert grew("parley_rate_limit_refusals_total", key="req-openai", limit="requests") >= 1
    assert grew("parley_http_requests_total", method="POST", route="/v1/embeddings", status="429") >= 1
