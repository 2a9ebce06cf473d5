"""Several models with the real SmolLM2: routing by name, listing, per-model defaults, inline loads,
LRU eviction that never cuts a stream, keep_alive.

The second model is the same GGUF linked under another name, with its own `Other.parley.yml`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_FILE, MODEL_NAME, Keys, make_config, wait_loaded

OTHER = "Other"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# Prompts whose greedy continuation SmolLM2 knows: a wrong model or crossed streams would show.
PROMPTS = {"1, 2, 3, 4, 5,": " 6, 7", "a, b, c, d, e,": " f, g", "10, 20, 30, 40,": " 50, 60",
           "January, February, March,": "April"}


def model_dir_with_two(tmp: Path, model_path: Path) -> Path:
    d = tmp / "models"
    d.mkdir()
    (d / MODEL_FILE).symlink_to(model_path)
    (d / f"{OTHER}.gguf").symlink_to(model_path)
    (d / f"{OTHER}.parley.yml").write_text(
        "model:\n  max_seq_len: 384\n  max_batch_size: 2\nsampling:\n  max_tokens: 3\n  ignore_eos: true\n"
    )
    return d


def app(tmp: Path, model_dir: Path, **model: Any) -> TestClient:
    from endpoints.app import create_app

    settings = {"max_seq_len": 512, "max_batch_size": 4, "n_threads": 1} | model
    return TestClient(create_app(make_config(tmp, model_dir, model=settings)))


@pytest.fixture(scope="module")
def two(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Keys]]:
    """Up to two models; inline loading for the admin key (the default); dummy names on."""
    tmp = tmp_path_factory.mktemp("two")
    with app(tmp, model_dir_with_two(tmp, model_path), max_loaded_models=2, inline_model_loading=True,
             use_dummy_models=True, dummy_model_names=["gpt-3.5-turbo"]) as client:
        wait_loaded(client)
        yield client, Keys(tmp / "api_tokens.yml")


@pytest.fixture(scope="module")
def one(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One model at a time; any API key may load inline."""
    tmp = tmp_path_factory.mktemp("one")
    with app(tmp, model_dir_with_two(tmp, model_path), max_seq_len=256, max_batch_size=2, max_loaded_models=1,
             inline_model_loading=True, inline_model_loading_admin_only=False) as client:
        wait_loaded(client)
        client.headers["Authorization"] = f"Bearer {Keys(tmp / 'api_tokens.yml').api}"
        yield client


def completion(client: TestClient, model: str | None, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0} | extra
    if model is not None:
        body["model"] = model
    r = client.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_completion(client: TestClient, model: str, max_tokens: int, started: threading.Event,
                      out: dict[str, Any]) -> None:
    """Stream a completion; record its text, finish reason, usage and any error frame."""
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, errors = [], []
    with client.stream("POST", COMPLETIONS, json=body) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                out["done"] = out.get("done", False) or line == "data: [DONE]"
                continue
            frame = json.loads(line[6:])
            if "error" in frame:
                errors.append(frame["error"])
            elif frame["choices"]:
                text.append(frame["choices"][0]["text"])
                out["model"] = frame["model"]
                out["finish"] = frame["choices"][0]["finish_reason"] or out.get("finish")
                started.set()
            else:
                out["usage"] = frame["usage"]
    out.update(text="".join(text), errors=errors)


def state(client: TestClient, name: str) -> str:
    data = client.get("/health").json()["models"]
    return data.get(name, {}).get("state", "absent")


def wait_state(client: TestClient, name: str, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while state(client, name) != wanted:
        assert time.monotonic() < deadline, f"{name} never became {wanted}: {client.get('/health').json()}"
        time.sleep(0.05)


# -- two models ------------------------------------------------------------------------
def test_list_shows_the_model_directory_with_metadata(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    admin = client.get("/v1/model/list", headers=keys.admin_headers()).json()["data"]
    by_id = {m["id"]: m for m in admin}
    assert [m["id"] for m in admin] == ["gpt-3.5-turbo", MODEL_NAME, OTHER]  # dummies, loaded, the rest
    main, other = by_id[MODEL_NAME], by_id[OTHER]
    for card in (main, other):
        assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"] == "parley"
        assert (card["format"], card["architecture"], card["quantization"]) == ("gguf", "llama", "Q4_1")
        assert card["context_length"] == 8192 and card["parameter_count"] == 134_515_008
        assert card["parameter_size"] == "135M" and card["size_bytes"] > 50_000_000
    assert main["loaded"] and main["state"] == "loaded" and main["default"]
    assert main["parameters"]["max_seq_len"] == 512 and main["parameters"]["max_batch_size"] == 4
    assert not other["loaded"] and other["state"] == "available" and "parameters" not in other
    assert other["defaults_file"] == f"{OTHER}.parley.yml"
    assert by_id["gpt-3.5-turbo"]["alias_of"] == MODEL_NAME
    # An API key that may not load models sees what is loaded (and the dummy names).
    api = client.get("/v1/models", headers=keys.api_headers()).json()
    assert api["object"] == "list" and [m["id"] for m in api["data"]] == ["gpt-3.5-turbo", MODEL_NAME]
    # /v1/model describes the default model, or the one named.
    assert client.get("/v1/model", headers=keys.api_headers()).json()["id"] == MODEL_NAME
    named = client.get("/v1/model", params={"model": OTHER}, headers=keys.api_headers()).json()
    assert named["id"] == OTHER and named["state"] == "available"
    r = client.get("/v1/model", params={"model": "nope"}, headers=keys.api_headers())
    assert r.status_code == 404 and OTHER in r.json()["error"]["message"]


def test_dummy_names_default_model_and_inline_permission(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    client.headers.update(keys.api_headers())
    for name in ("gpt-3.5-turbo", None, MODEL_NAME, f"{MODEL_NAME}.gguf"):
        body = completion(client, name, "1, 2, 3, 4, 5,")
        assert body["model"] == MODEL_NAME and PROMPTS["1, 2, 3, 4, 5,"] in body["choices"][0]["text"]
    # Loading from a request needs the admin key here (inline_model_loading_admin_only).
    r = client.post(COMPLETIONS, json={"model": OTHER, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    r = client.post("/api/v1/generate", json={"prompt": "hi", "max_length": 2})  # Kobold: the default model
    assert r.status_code == 200
    # With inline loading on, an unknown name is an error, never another model's answer.
    r = client.post(CHAT, json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert state(client, OTHER) == "absent"


def test_loading_a_second_model_during_streams_loses_nothing(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    client.headers.update(keys.api_headers())
    outs: list[dict[str, Any]] = [{} for _ in range(2)]
    started = [threading.Event() for _ in outs]
    threads = [threading.Thread(target=stream_completion, args=(client, MODEL_NAME, 24, s, o))
               for s, o in zip(started, outs)]
    for t in threads:
        t.start()
    assert all(s.wait(60) for s in started)
    # The admin key loads the second model inline while the streams run.
    r = client.post(COMPLETIONS, headers=keys.admin_headers() | {"Authorization": ""},
                    json={"model": OTHER, "prompt": "a, b, c, d, e,", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == OTHER and PROMPTS["a, b, c, d, e,"] in r.json()["choices"][0]["text"]
    for t in threads:
        t.join(120)
    for out in outs:
        assert out["status"] == 200 and out["errors"] == [] and out["done"]
        assert out["model"] == MODEL_NAME and out["finish"] == "length"
        assert out["usage"]["completion_tokens"] == 24
    health = client.get("/health").json()["models"]
    assert health[MODEL_NAME]["state"] == health[OTHER]["state"] == "loaded"
    assert health[MODEL_NAME]["active_requests"] == 0 and health[OTHER]["active_requests"] == 0


def test_per_model_defaults_file_applies(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    client.headers.update(keys.api_headers())
    card = client.get("/v1/model", params={"model": OTHER}).json()
    assert card["state"] == "loaded" and card["defaults_file"] == f"{OTHER}.parley.yml"
    assert card["parameters"]["max_seq_len"] == 384 and card["parameters"]["max_batch_size"] == 2
    assert card["parameters"]["sampling_defaults"]["max_tokens"]["override"] == 3
    assert client.get("/v1/model").json()["parameters"]["max_seq_len"] == 512  # the other model: server config
    # The file's sampling defaults apply to requests for that model only.
    body = completion(client, OTHER, "Tell me a story.", max_tokens=None, temperature=None)
    assert body["usage"]["completion_tokens"] == 3
    body = completion(client, OTHER, "Tell me a story.", max_tokens=5, temperature=None)
    assert body["usage"]["completion_tokens"] == 5  # the request's own fields win
    assert client.get("/v1/model").json()["parameters"]["sampling_defaults"] == {}
    # Context limits follow each model's own max_seq_len.
    r = client.post(COMPLETIONS, json={"model": OTHER, "prompt": "word " * 400, "max_tokens": 2})
    assert r.status_code == 400 and "384" in r.json()["error"]["message"]


def test_requests_interleave_across_two_models(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    client.headers.update(keys.api_headers())
    results: list[tuple[str, str, dict[str, Any]]] = []
    lock = threading.Lock()

    def worker(model: str, prompts: list[str]) -> None:
        for prompt in prompts:
            body = completion(client, model, prompt)
            with lock:
                results.append((model, prompt, body))

    prompts = list(PROMPTS)
    threads = [threading.Thread(target=worker, args=(model, prompts[i::2]))
               for i in range(2) for model in (MODEL_NAME, OTHER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    for model, prompt, body in results:
        assert body["model"] == model
        assert PROMPTS[prompt] in body["choices"][0]["text"], (model, prompt, body["choices"][0]["text"])
    stats = client.get("/health").json()["models"]
    assert stats[MODEL_NAME]["requests_finished"] > 0 and stats[OTHER]["requests_finished"] > 0


def test_unload_by_name_and_keep_alive_through_ollama(two: tuple[TestClient, Keys]) -> None:
    client, keys = two
    client.headers.update(keys.api_headers())
    # Ollama's keep_alive sets how long the model stays loaded once idle.
    r = client.post("/api/generate", json={"model": OTHER, "prompt": "Hi", "stream": False, "keep_alive": "3s",
                                           "options": {"num_predict": 2}})
    assert r.status_code == 200, r.text
    ps = {m["name"]: m for m in client.get("/api/ps").json()["models"]}
    assert ps[f"{OTHER}:latest"]["expires_at"] < "2300" and ps[f"{MODEL_NAME}:latest"]["expires_at"] > "2300"
    wait_state(client, OTHER, "unloaded_idle")
    assert client.get("/health").json()["status"] == "healthy"
    # The next request naming it loads it again (with the options it had), even with an API key.
    body = completion(client, OTHER, "10, 20, 30, 40,")
    assert body["model"] == OTHER and PROMPTS["10, 20, 30, 40,"] in body["choices"][0]["text"]
    assert client.get("/v1/model", params={"model": OTHER}).json()["parameters"]["max_seq_len"] == 384
    # An admin unload by name leaves the other model serving.
    r = client.post("/v1/model/unload", json={"model_name": OTHER}, headers=keys.admin_headers() | {"Authorization": ""})
    assert r.json() == {"unloaded": [OTHER]}
    assert state(client, OTHER) == "absent" and state(client, MODEL_NAME) == "loaded"
    assert completion(client, None, "1, 2, 3, 4, 5,")["model"] == MODEL_NAME


# -- one model at a time -------------------------------------------------------------------
def test_concurrent_inline_loads_load_once_and_evict_the_idle_model(
    one: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.models.catalog

    real = common.models.catalog.load_engine
    loads: list[str] = []

    def counting(*args: Any, **kw: Any) -> Any:
        loads.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(common.models.catalog, "load_engine", counting)
    bodies: list[dict[str, Any]] = []

    def ask(prompt: str) -> None:
        bodies.append(completion(one, OTHER, prompt))

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert loads == [OTHER]
    assert len(bodies) == 4 and all(b["model"] == OTHER for b in bodies)
    listing = {m["id"]: m for m in one.get("/v1/model/list").json()["data"]}  # every key sees the directory here
    assert listing[OTHER]["state"] == "loaded" and listing[MODEL_NAME]["state"] == "available"


def test_eviction_waits_for_the_running_stream(one: TestClient) -> None:
    assert state(one, OTHER) == "loaded"
    out: dict[str, Any] = {}
    started = threading.Event()
    stream = threading.Thread(target=stream_completion, args=(one, OTHER, 24, started, out))
    stream.start()
    assert started.wait(60)
    # Loading the default model needs Other's place: it waits for the stream instead of cutting it.
    body = completion(one, MODEL_NAME, "1, 2, 3, 4, 5,")
    stream.join(120)
    assert out["errors"] == [] and out["done"] and out["finish"] == "length"
    assert out["usage"]["completion_tokens"] == 24
    assert body["model"] == MODEL_NAME and PROMPTS["1, 2, 3, 4, 5,"] in body["choices"][0]["text"]
    assert state(one, OTHER) == "absent" and state(one, MODEL_NAME) == "loaded"


def test_load_refused_with_503_while_every_model_is_busy(one: TestClient) -> None:
    models = one.app.state.models  # type: ignore[attr-defined]
    settings = models.settings
    models.settings = replace(settings, load_wait_timeout=0)
    try:
        out: dict[str, Any] = {}
        started = threading.Event()
        stream = threading.Thread(target=stream_completion, args=(one, MODEL_NAME, 16, started, out))
        stream.start()
        assert started.wait(60)
        r = one.post(CHAT, json={"model": OTHER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert "serving requests" in r.json()["error"]["message"]
        r = one.post("/api/chat", json={"model": OTHER, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "Retry" in r.json()["error"]  # Ollama's shape, same rule
        stream.join(120)
        assert out["errors"] == [] and out["finish"] == "length" and out["usage"]["completion_tokens"] == 16
        assert state(one, MODEL_NAME) == "loaded"
    finally:
        models.settings = settings


def test_a_reload_that_fails_restores_the_model_as_it_was(model_dir: Path, tmp_path: Path) -> None:
    """New options that cannot load (a KV cache far beyond memory) end in an error frame, and the
    model comes back with its previous options instead of staying unloaded."""
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, model={"max_seq_len": 512})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        admin = Keys(tmp_path / "api_tokens.yml").admin_headers()
        r = client.post("/v1/model/load", json={"model_name": MODEL_NAME, "max_seq_len": 1 << 24, "cache_size": 1 << 24},
                        headers=admin)
        assert r.status_code == 200 and '"error"' in r.text and '"finished"' not in r.text
        wait_loaded(client)
        card = client.get("/v1/model", headers=admin).json()
        assert card["id"] == MODEL_NAME and card["parameters"]["max_seq_len"] == 512
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, headers=admin)
        assert r.status_code == 200, r.text
