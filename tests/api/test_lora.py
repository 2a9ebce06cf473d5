"""LoRA stacks on the real model, with real adapter GGUFs built for SmolLM2's shapes.

Every output compared here is the second run of its (prompt, adapter set): the
first run leaves the prompt cached, so both compared runs start from the same
cache state (see the note on float rounding in the README).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME, Keys, make_config, wait_loaded
from tests.lora_gguf import write_lora

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def lora_app(model_dir: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("lora")
    lora_dir = tmp / "loras"
    lora_dir.mkdir()
    write_lora(lora_dir / "sea-a.gguf", model_path, seed=1, magnitude=0.08)
    folder = lora_dir / "sea-b"
    folder.mkdir()
    write_lora(
        folder / "adapter.gguf", model_path, seed=2, magnitude=0.12, layers=(1, 2, 3, 4, 5, 6), targets=("attn_v", "ffn_gate")
    )
    config = make_config(tmp, model_dir, lora={"lora_dir": str(lora_dir)}, model={"max_batch_size": 4})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        keys = Keys(tmp / "api_tokens.yml")
        client.headers.update({"Authorization": f"Bearer {keys.admin}"})
        yield client, keys


def chat(client: TestClient, loras: list[dict[str, Any]] | None = None, max_tokens: int = 16) -> str:
    body: dict[str, Any] = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    if loras is not None:
        body["loras"] = loras
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def warm(client: TestClient, loras: list[dict[str, Any]] | None = None, max_tokens: int = 16) -> str:
    chat(client, loras, max_tokens)
    return chat(client, loras, max_tokens)


def load(client: TestClient, loras: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/v1/lora/load", json={"loras": loras})
    assert r.status_code == 200, r.text
    return r.json()


def test_lists_adapters_on_disk(lora_app) -> None:
    client, keys = lora_app
    r = client.get("/v1/lora/list", headers={"Authorization": f"Bearer {keys.api}"})
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["data"]] == ["sea-a", "sea-b"]
    assert all(c["object"] == "lora" and c["size_bytes"] > 0 for c in r.json()["data"])


def test_scale_zero_is_base_nonzero_changes_unload_restores(lora_app) -> None:
    client, _ = lora_app
    base = warm(client)
    assert load(client, [{"name": "sea-a", "scaling": 0.0}]) == {"success": ["sea-a"], "failure": []}
    assert warm(client) == base
    load(client, [{"name": "sea-a", "scaling": 1.0}])
    with_a = warm(client)
    assert with_a != base
    active = client.get("/v1/loras").json()["data"]
    assert [(c["id"], c["scaling"]) for c in active] == [("sea-a", 1.0)]
    r = client.post("/v1/lora/unload", json={})
    assert r.status_code == 200 and r.json() == {"unloaded": ["sea-a"]}
    assert client.get("/v1/loras").json()["data"] == []
    assert warm(client) == base


def test_two_adapters_stack_with_their_own_scales(lora_app) -> None:
    client, _ = lora_app
    base = warm(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}])
    only_a = warm(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}])
    both = warm(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 0.0}])
    assert warm(client) == only_a  # b at scale 0 is not applied at all
    assert len({base, only_a, both}) == 3
    scales = {c["id"]: c["scaling"] for c in client.get("/v1/loras").json()["data"]}
    assert scales == {"sea-a": 1.0, "sea-b": 0.0}
    client.post("/v1/lora/unload", json={})


def test_per_request_loras_override_the_active_set(lora_app) -> None:
    client, _ = lora_app
    base = warm(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 0.0}])
    only_a = warm(client)
    # Active set is {a}; a request may ask for none, or for another stack, for itself only.
    assert warm(client, loras=[]) == base
    both = warm(client, loras=[{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}])
    assert both not in (base, only_a)
    assert warm(client) == only_a
    client.post("/v1/lora/unload", json={})


def test_requests_with_different_adapter_sets_batch_correctly(lora_app) -> None:
    client, _ = lora_app
    load(client, [{"name": "sea-a", "scaling": 0.0}, {"name": "sea-b", "scaling": 0.0}])
    sets: list[list[dict[str, Any]]] = [
        [],
        [{"name": "sea-a", "scaling": 1.0}],
        [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}],
        [],
    ]
    alone = [warm(client, s, max_tokens=16) for s in sets]
    assert len(set(alone[:3])) == 3
    with ThreadPoolExecutor(len(sets)) as pool:
        together = list(pool.map(lambda s: chat(client, s, max_tokens=16), sets))
    assert together == alone
    health = client.get("/health").json()["models"][MODEL_NAME]
    assert health["slots_active"] == 0 and health["kv_cells_used"] == 0
    client.post("/v1/lora/unload", json={})


def test_bad_names_and_unloaded_adapters_are_client_errors(lora_app) -> None:
    client, keys = lora_app
    r = client.post("/v1/lora/load", json={"loras": [{"name": "../sea-a"}, {"name": "missing"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] == [] and body["failure"] == ["../sea-a", "missing"]
    assert "Invalid lora name" in body["errors"]["../sea-a"] and "missing" in body["errors"]["missing"]
    r = client.post(
        "/v1/chat/completions",
        json={"messages": PROMPT, "max_tokens": 4, "loras": [{"name": "sea-b", "scaling": 1}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras"
    assert "POST /v1/lora/load" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": PROMPT, "loras": [{"name": "x", "scaling": "big"}]})
    assert r.status_code in (400, 422) and "loras" in r.text
    r = client.post("/v1/lora/load", json={"loras": [{"name": "sea-a"}]}, headers={"Authorization": f"Bearer {keys.api}"})
    assert r.status_code == 403


def test_configured_adapters_load_with_the_startup_model(model_dir: Path, model_path: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write_lora(lora_dir / "sea-a.gguf", model_path, seed=1)
    config = make_config(
        tmp_path, model_dir, lora={"lora_dir": str(lora_dir), "loras": [{"name": "sea-a", "scaling": 0.5}]}
    )
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        keys = Keys(tmp_path / "api_tokens.yml")
        for _ in range(100):
            data = client.get("/v1/loras", headers=keys.api_headers()).json()["data"]
            if data:
                break
            time.sleep(0.05)
        assert [(c["id"], c["scaling"]) for c in data] == [("sea-a", 0.5)]
        # A reload (new options) gets the configured adapters again.
        r = client.post("/v1/model/load", json={"model_name": MODEL_NAME, "max_seq_len": 1024}, headers=keys.admin_headers())
        assert r.status_code == 200 and '"finished"' in r.text
        data = client.get("/v1/loras", headers=keys.api_headers()).json()["data"]
        assert [(c["id"], c["scaling"]) for c in data] == [("sea-a", 0.5)]
