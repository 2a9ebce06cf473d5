"""LoRA stacks on the real model, with real adapter GGUFs built for SmolLM2's shapes.

Each test starts from no adapters loaded (the `fresh` fixture), so none depends
on another finishing. Outputs are compared greedily with logprobs: two runs
"agree" up to the first near-tie (tests/neartie.py), because the same request
can round differently when the KV cache holds other sequences (see "Equality of
outputs" in the README); "differ" means a difference no rounding explains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_NAME, Keys, make_config, wait_loaded
from tests.lora_gguf import write_lora
from tests.neartie import Step, assert_agree, clearly_differ, steps_from_openai, text_of

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def lora_app(model_dir: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("lora")
    lora_dir = tmp / "loras"
    lora_dir.mkdir()
    write_lora(lora_dir / "sea-a.gguf", model_path, seed=1, magnitude=0.2)
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


@pytest.fixture
def fresh(lora_app) -> Iterator[tuple[TestClient, Keys]]:
    """The module's app with no adapter loaded, before and after the test."""
    client, keys = lora_app
    assert client.post("/v1/lora/unload", json={}).status_code == 200
    yield client, keys
    client.post("/v1/lora/unload", json={})


def chat(client: TestClient, loras: list[dict[str, Any]] | None = None, max_tokens: int = 16) -> list[Step]:
    body: dict[str, Any] = {
        "model": MODEL_NAME, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": True, "top_logprobs": 2,
    }
    if loras is not None:
        body["loras"] = loras
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    steps = steps_from_openai(r.json())
    assert text_of(steps) == r.json()["choices"][0]["message"]["content"]
    return steps


def differ(a: list[Step], b: list[Step]) -> bool:
    """The two outputs come from different distributions, beyond what float rounding can explain."""
    return clearly_differ(a, b)


def load(client: TestClient, loras: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/v1/lora/load", json={"loras": loras})
    assert r.status_code == 200, r.text
    return r.json()


def test_lists_adapters_on_disk(fresh) -> None:
    client, keys = fresh
    r = client.get("/v1/lora/list", headers={"Authorization": f"Bearer {keys.api}"})
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["data"]] == ["sea-a", "sea-b"]
    assert all(c["object"] == "lora" and c["size_bytes"] > 0 for c in r.json()["data"])


def test_scale_zero_is_base_nonzero_changes_unload_restores(fresh) -> None:
    client, _ = fresh
    base = chat(client)
    assert load(client, [{"name": "sea-a", "scaling": 0.0}]) == {"success": ["sea-a"], "failure": []}
    assert_agree(chat(client), base, label="sea-a at scale 0")
    load(client, [{"name": "sea-a", "scaling": 1.0}])
    assert differ(chat(client), base)
    active = client.get("/v1/loras").json()["data"]
    assert [(c["id"], c["scaling"]) for c in active] == [("sea-a", 1.0)]
    r = client.post("/v1/lora/unload", json={})
    assert r.status_code == 200 and r.json() == {"unloaded": ["sea-a"]}
    assert client.get("/v1/loras").json()["data"] == []
    assert_agree(chat(client), base, label="after unload")


def test_two_adapters_stack_with_their_own_scales(fresh) -> None:
    client, _ = fresh
    base = chat(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}])
    only_a = chat(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}])
    both = chat(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 0.0}])
    assert_agree(chat(client), only_a, label="sea-b at scale 0 is not applied")
    assert differ(base, only_a) and differ(base, both) and differ(only_a, both)
    scales = {c["id"]: c["scaling"] for c in client.get("/v1/loras").json()["data"]}
    assert scales == {"sea-a": 1.0, "sea-b": 0.0}


def test_per_request_loras_override_the_active_set(fresh) -> None:
    client, _ = fresh
    base = chat(client)
    load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 0.0}])
    only_a = chat(client)
    # Active set is {a}; a request may ask for none, or for another stack, for itself only.
    assert_agree(chat(client, loras=[]), base, label="loras=[]")
    both = chat(client, loras=[{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}])
    assert differ(both, base) and differ(both, only_a)
    assert_agree(chat(client), only_a, label="the active set again")


SETS: list[list[dict[str, Any]]] = [
    [],
    [{"name": "sea-a", "scaling": 1.0}],
    [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}],
    [],
]


def batch_against_alone(client: TestClient) -> None:
    alone = [chat(client, s) for s in SETS]
    assert differ(alone[0], alone[1]) and differ(alone[0], alone[2]) and differ(alone[1], alone[2])
    with ThreadPoolExecutor(len(SETS)) as pool:
        together = list(pool.map(lambda s: chat(client, s), SETS))
    for i, (a, b) in enumerate(zip(together, alone)):
        assert_agree(a, b, label=f"set {i} batched vs alone")
    health = client.get("/health").json()["models"][MODEL_NAME]
    assert health["slots_active"] == 0 and health["kv_cells_used"] == 0


def test_requests_with_different_adapter_sets_batch_correctly(fresh) -> None:
    client, _ = fresh
    load(client, [{"name": "sea-a", "scaling": 0.0}, {"name": "sea-b", "scaling": 0.0}])
    batch_against_alone(client)


def test_adapter_history_does_not_leak_into_later_batches(fresh) -> None:
    """Replays the history that once made a batched LoRA output look wrong: loads, unloads,
    reloads and active-set switches, then batches mixed adapter sets against each alone."""
    client, _ = fresh
    for _ in range(2):
        load(client, [{"name": "sea-a", "scaling": 1.0}])
        chat(client)
        load(client, [{"name": "sea-a", "scaling": 1.0}, {"name": "sea-b", "scaling": 2.0}])
        chat(client)
        chat(client, loras=[])
        client.post("/v1/lora/unload", json={})
        chat(client)
    load(client, [{"name": "sea-a", "scaling": 0.0}, {"name": "sea-b", "scaling": 0.0}])
    batch_against_alone(client)


def test_bad_names_and_unloaded_adapters_are_client_errors(fresh) -> None:
    client, keys = fresh
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
