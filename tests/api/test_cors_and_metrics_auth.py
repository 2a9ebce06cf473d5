"""CORS (off by default, explicit origins, "*") and who may read /metrics; no model is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Keys, make_config

GOOD, EVIL = "http://app.example", "http://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def app_client(tmp_path: Path, model_dir: Path, **network: Any) -> TestClient:
    from endpoints.app import create_app

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = make_config(tmp_path, model_dir, network=network)
    return TestClient(create_app(config, load_model_on_startup=False))


def test_no_cross_origin_access_by_default(tmp_path: Path, model_dir: Path) -> None:
    with app_client(tmp_path, model_dir) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": GOOD, **PREFLIGHT})
        assert "access-control-allow-origin" not in r.headers
        assert r.status_code == 405  # no CORS layer answers the preflight
        r = client.get("/health", headers={"Origin": GOOD})
        assert "access-control-allow-origin" not in r.headers


def test_listed_origins_pass_the_preflight_and_others_do_not(tmp_path: Path, model_dir: Path) -> None:
    with app_client(tmp_path, model_dir, cors_origins=[GOOD]) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": GOOD, **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == GOOD
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.options("/v1/chat/completions", headers={"Origin": EVIL, **PREFLIGHT})
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
        # Actual requests: the allowed origin may read the answer (errors too, with Retry-After exposed).
        r = client.get("/v1/models", headers={"Origin": GOOD})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == GOOD
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        r = client.get("/v1/models", headers={"Origin": EVIL})
        assert "access-control-allow-origin" not in r.headers


def test_star_allows_any_origin(tmp_path: Path, model_dir: Path) -> None:
    with app_client(tmp_path, model_dir, cors_origins=["*"]) as client:
        r = client.options("/api/chat", headers={"Origin": EVIL, **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        keys = Keys(tmp_path / "api_tokens.yml")
        r = client.get("/v1/models", headers={"Origin": EVIL, **keys.api_headers()})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("mode", "anonymous", "api", "admin"),
    [("none", 200, 200, 200), ("api", 401, 200, 200), ("admin", 401, 403, 200)],
)
def test_metrics_auth_modes(tmp_path: Path, model_dir: Path, mode: str, anonymous: int, api: int, admin: int) -> None:
    with app_client(tmp_path, model_dir, metrics_auth=mode) as client:
        keys = Keys(tmp_path / "api_tokens.yml")
        assert client.get("/metrics").status_code == anonymous
        assert client.get("/metrics", headers=keys.api_headers()).status_code == api
        r = client.get("/metrics", headers=keys.admin_headers())
        assert r.status_code == admin
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"parley_http_requests", "parley_models_loaded", "parley_draining"} <= names


def test_metrics_can_be_turned_off(tmp_path: Path, model_dir: Path) -> None:
    with app_client(tmp_path, model_dir, enable_metrics=False) as client:
        keys = Keys(tmp_path / "api_tokens.yml")
        assert client.get("/metrics", headers=keys.admin_headers()).status_code == 404


def test_each_app_has_its_own_registry(tmp_path: Path, model_dir: Path) -> None:
    with app_client(tmp_path / "a", model_dir, metrics_auth="none") as a, \
            app_client(tmp_path / "b", model_dir, metrics_auth="none") as b:
        for _ in range(3):
            a.get("/health")
        b.get("/health")

        def health_count(client: TestClient) -> float:
            for family in text_string_to_metric_families(client.get("/metrics").text):
                for s in family.samples:
                    if s.name == "parley_http_requests_total" and s.labels["route"] == "/health":
                        return s.value
            return 0.0

        assert health_count(a) == 3 and health_count(b) == 1
