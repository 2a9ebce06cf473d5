"""Admin/core API with the real model: models, load/unload, tokens, auth, paths."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME, Keys, make_config, wait_loaded

CHAT = "/v1/chat/completions"


def load_events(client: TestClient, body: dict, headers: dict | None = None) -> tuple[int, list[dict]]:
    with client.stream("POST", "/v1/model/load", json=body, headers=headers or {}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    return r.status_code, events


def test_health_models_and_card(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    health = client.get("/health").json()
    assert health["status"] == "healthy" and health["issues"] == []
    stats = health["models"][MODEL_NAME]
    assert stats["slots_total"] >= 1 and stats["kv_cells_total"] >= 2048
    assert stats["slots_active"] == 0 and stats["queue_depth"] == 0
    api = client.get("/v1/models", headers=keys.api_headers()).json()
    assert [m["id"] for m in api["data"]] == [MODEL_NAME]
    card = client.get("/v1/model", headers=keys.api_headers()).json()
    assert card["id"] == MODEL_NAME
    assert card["parameters"]["max_seq_len"] == 2048
    assert card["parameters"]["backend"] == "llamacpp"
    props = client.get("/props", headers=keys.api_headers()).json()
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert props["total_slots"] >= 1 and "im_start" in props["chat_template"]


def test_token_round_trip(client: TestClient) -> None:
    text = "Hello, wörld! 你好 🙂"
    enc = client.post("/v1/token/encode", json={"text": text}).json()
    assert enc["length"] == len(enc["tokens"]) > 3
    dec = client.post("/v1/token/decode", json={"tokens": enc["tokens"]}).json()
    assert dec["text"] == text
    special = client.post("/v1/token/encode", json={"text": "<|im_start|>user"}).json()["tokens"]
    assert len(special) == 2  # the special marker is one token
    bad = client.post("/v1/token/decode", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_auth_missing_wrong_and_api_vs_admin(app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    bare = {"Authorization": ""}
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, headers=bare)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/v1/model/unload", json={}, headers=keys.api_headers())
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    r = client.post("/v1/template/switch", json={"name": "chatml"}, headers={"X-API-Key": keys.api, "Authorization": ""})
    assert r.status_code == 403
    perm = client.get("/v1/auth/permission", headers={"X-API-Key": keys.api, "Authorization": ""}).json()
    assert perm == {"permission": "api"}
    perm = client.get("/v1/auth/permission", headers={"X-Admin-Key": keys.admin, "Authorization": ""}).json()
    assert perm == {"permission": "admin"}


def test_model_names_are_confined(client: TestClient) -> None:
    for bad in ("../models/x", "/etc/passwd", "a/b", "..", "..\\x"):
        status, events = load_events(client, {"model_name": bad})
        assert status == 400, (bad, events)
        assert events[0]["error"]["param"] == "model_name"
    status, events = load_events(client, {"model_name": "no-such-model"})
    assert status == 404 and MODEL_NAME in events[0]["error"]["message"]


def test_admin_lists_model_directory(model_dir: Path, app_env: tuple[TestClient, Keys]) -> None:
    client, keys = app_env
    data = client.get("/v1/model/list", headers=keys.admin_headers() | {"Authorization": ""}).json()["data"]
    assert MODEL_NAME in [m["id"] for m in data]


def test_load_unload_reload(model_dir: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, network={"disable_auth": True})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        assert client.post("/v1/model/unload", json={}).json() == {"unloaded": [MODEL_NAME]}
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "load" in r.json()["error"]["message"].lower()
        assert client.get("/health").json()["issues"]
        status, events = load_events(client, {"model_name": MODEL_NAME, "max_seq_len": 1024, "max_batch_size": 4})
        assert status == 200
        assert events[-1]["status"] == "finished"
        assert any(e["status"] == "processing" for e in events)
        card = client.get("/v1/model").json()
        assert card["parameters"]["max_seq_len"] == 1024 and card["parameters"]["max_batch_size"] == 4
        # Loading the loaded model again reloads it with the new options.
        status, events = load_events(client, {"name": MODEL_NAME, "max_seq_len": 512})
        assert events[-1]["status"] == "finished"
        assert client.get("/v1/model").json()["parameters"]["max_seq_len"] == 512
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200


def test_unload_during_generation_ends_stream_cleanly(model_dir: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, network={"disable_auth": True})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        started = threading.Event()
        lines: list[str] = []

        def stream() -> None:
            payload = {"prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=payload) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        assert client.post("/v1/model/unload", json={}).status_code == 200
        t.join(30)
        assert not t.is_alive()
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert "unloaded" in error["message"]
        status, events = load_events(client, {"model_name": MODEL_NAME})
        assert events[-1]["status"] == "finished"
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200
