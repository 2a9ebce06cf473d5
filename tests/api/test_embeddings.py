"""Embeddings and rerank through the app, with real models on both engines (infinity-emb and llama.cpp).

The two engines run the same weights (all-MiniLM-L6-v2, and its GGUF written by scripts/bert_to_gguf.py),
so their vectors must agree; the rerankers are a test-made cross-encoder whose scores mean nothing
(tests/embedding_models.py): only the two engines' agreement and the plumbing are checked.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_FILE, MODEL_NAME, Keys, make_config, wait_loaded
from tests.embedding_models import EMBED, EMBED_GGUF, RERANK, RERANK_GGUF, cosine, make_embedding_models

pytest.importorskip("infinity_emb", reason="needs the embeddings extra: pip install '.[embeddings]'")

TEXTS = [
    "a cat sat on the mat",
    "a kitten rested on the rug",
    "quarterly stock market report",
    "Ünïcödé text, with punctuation!? and numbers 1234.",
    "The quick brown fox jumps over the lazy dog. " * 6,
]
CAT, KITTEN, STOCKS = TEXTS[:3]


@pytest.fixture(scope="module")
def client(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("embed")
    models = make_embedding_models(tmp / "models")
    (models / MODEL_FILE).symlink_to(model_path)
    config = make_config(tmp, models, embeddings={"embedding_model_name": EMBED_GGUF, "max_loaded_embedding_models": 4})
    with TestClient(create_app(config)) as c:
        wait_loaded(c)
        c.headers.update(Keys(tmp / "api_tokens.yml").admin_headers())
        for name in (EMBED, RERANK, RERANK_GGUF):
            r = c.post("/v1/model/embedding/load", json={"embedding_model_name": name})
            assert r.status_code == 200, r.text
        yield c


def vectors(client: TestClient, model: str, texts: list[str], **extra: Any) -> list[list[float]]:
    r = client.post("/v1/embeddings", json={"model": model, "input": texts, **extra})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


# -- the engines against each other ----------------------------------------------------------------
def test_engines_agree(client: TestClient) -> None:
    a = vectors(client, EMBED, TEXTS)
    b = vectors(client, EMBED_GGUF, TEXTS)
    sims = [cosine(x, y) for x, y in zip(a, b)]
    print("cross-engine cosine:", [round(s, 6) for s in sims])
    assert min(sims) >= 0.99, sims
    assert all(len(v) == 384 and abs(np.linalg.norm(v) - 1) < 1e-4 for v in a + b)


@pytest.mark.parametrize("model", [EMBED, EMBED_GGUF])
def test_meaning(client: TestClient, model: str) -> None:
    cat, kitten, stocks = vectors(client, model, [CAT, KITTEN, STOCKS])
    near, far = cosine(cat, kitten), cosine(cat, stocks)
    print(f"{model}: sim(cat, kitten) = {near:.4f}, sim(cat, stocks) = {far:.4f}")
    assert near > far + 0.3


def test_gguf_batched_matches_alone(client: TestClient) -> None:
    """32 inputs share one forward pass (one sequence each); each matches the same input embedded alone."""
    batch = [f"sentence number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(32)]
    together = vectors(client, EMBED_GGUF, batch)
    for i in (0, 7, 31):
        assert cosine(together[i], vectors(client, EMBED_GGUF, [batch[i]])[0]) > 0.9999


def test_concurrent_requests_each_get_their_own(client: TestClient) -> None:
    alone = {t: vectors(client, EMBED_GGUF, [t])[0] for t in TEXTS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: (t, vectors(client, EMBED_GGUF, [t])[0]), TEXTS * 4))
    assert all(cosine(v, alone[t]) > 0.9999 for t, v in got)


# -- OpenAI's fields --------------------------------------------------------------------------------
def test_base64_dimensions_usage_and_token_ids(client: TestClient) -> None:
    floats = vectors(client, EMBED_GGUF, [CAT])[0]
    r = client.post("/v1/embeddings", json={"model": EMBED_GGUF, "input": CAT, "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats, atol=1e-6)
    assert r.json()["usage"] == {"prompt_tokens": 8, "total_tokens": 8}  # [CLS] a cat sat on the mat [SEP]

    short = vectors(client, EMBED_GGUF, [CAT], dimensions=64)[0]
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-5
    assert cosine(short, floats[:64]) > 0.9999

    ids = client.post("/v1/token/encode", json={"model": EMBED_GGUF, "text": CAT}).json()["tokens"]
    for model in (EMBED_GGUF, EMBED):
        by_ids = vectors(client, model, [ids])[0] if model == EMBED_GGUF else vectors(client, model, ids)[0]
        assert cosine(by_ids, vectors(client, model, [CAT])[0]) > 0.99


def test_truncate_cuts_long_input(client: TestClient) -> None:
    long = "word " * 2000
    for model in (EMBED, EMBED_GGUF):
        r = client.post("/v1/embeddings", json={"model": model, "input": [long]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0]", r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/embeddings", json={"model": model, "input": [long], "truncate": True})
        assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = client.post("/api/embed", json={"model": EMBED, "input": long})  # Ollama truncates by default
    assert r.status_code == 200
    r = client.post("/api/embed", json={"model": EMBED, "input": long, "truncate": False})
    assert r.status_code == 400 and "input" in r.json()["error"]


# -- every dialect's route ----------------------------------------------------------------------
def test_every_route_gives_the_same_vector(client: TestClient) -> None:
    want = vectors(client, EMBED_GGUF, [CAT])[0]
    got = [
        client.post("/api/embed", json={"model": EMBED_GGUF, "input": [CAT]}).json()["embeddings"][0],
        client.post("/api/embeddings", json={"model": EMBED_GGUF, "prompt": CAT}).json()["embedding"],
        client.post("/api/extra/embeddings", json={"model": EMBED_GGUF, "input": [CAT]}).json()["data"][0]["embedding"],
        client.post("/embedding", json={"model": EMBED_GGUF, "content": CAT}).json()[0]["embedding"][0],
    ]
    assert all(cosine(v, want) > 0.99999 for v in got)
    body = client.post("/api/embed", json={"model": EMBED_GGUF, "input": [CAT, KITTEN]}).json()
    assert len(body["embeddings"]) == 2 and body["prompt_eval_count"] == 16 and body["model"] == EMBED_GGUF
    assert client.get("/api/extra/version").json()["embeddings"] is True


def test_no_model_name_means_the_default_embedding_model(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": CAT, "model": "text-embedding-3-small"})
    assert r.status_code == 200 and r.json()["model"] == EMBED_GGUF  # the startup embedding model
    assert client.post("/api/extra/embeddings", json={"input": CAT}).json()["model"] == EMBED_GGUF


# -- bad input, in each dialect's shape, naming the field --------------------------------------
def _error(r: Any) -> str:
    body = r.json()
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]  # Ollama
    if isinstance(body, dict) and "detail" in body:
        return f"{body['detail'].get('param')} {body['detail']['msg']}"  # Kobold
    err = body["error"]
    return f"{err.get('param')} {err['message']}"


BAD = [
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["ok", 5]}, "input[1]"),
    ("/v1/embeddings", {"input": ["ok", {"text": "x"}]}, "input[1]"),
    ("/v1/embeddings", {"input": [[101, 99999999]]}, "input[0]"),
    ("/v1/embeddings", {"input": [101, -1]}, "input[0]"),
    ("/v1/embeddings", {"input": "x", "dimensions": 385}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "model": MODEL_NAME}, "model"),
    ("/api/embed", {"input": ""}, "input"),
    ("/api/embed", {"input": []}, "input"),
    ("/api/embed", {"input": ["a", None]}, "input[1]"),
    ("/api/embed", {"model": MODEL_NAME, "input": "x"}, "embeddings"),
    ("/api/embeddings", {"prompt": ["a"]}, "prompt"),
    ("/api/extra/embeddings", {"input": []}, "input"),
    ("/api/extra/embeddings", {"input": [3.5]}, "input[0]"),
    ("/embedding", {"content": ""}, "content"),
    ("/embedding", {"content": ["a", 1.5]}, "content[1]"),
    ("/embedding", {"content": "a", "embd_normalize": 0}, "embd_normalize"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 7]}, "documents[1]"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("/rerank", {"query": "q"}, "documents"),
    ("/v2/rerank", {"model": MODEL_NAME, "query": "q", "documents": ["a"]}, "model"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(client: TestClient, path: str, body: dict[str, Any], field: str) -> None:
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert field in _error(r), r.text


def test_embedding_model_on_a_chat_route_is_refused(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": EMBED, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = client.post("/api/generate", json={"model": EMBED_GGUF, "prompt": "hi", "stream": False})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200  # the chat model is still the default


# -- rerank -----------------------------------------------------------------------------------------
def test_cross_encoder_engines_agree(client: TestClient) -> None:
    """The test cross-encoder's scores are meaningless; the two engines must compute the same ones."""
    docs = [KITTEN, STOCKS, TEXTS[3]]
    scores = {}
    for model in (RERANK, RERANK_GGUF):
        r = client.post("/v1/rerank", json={"model": model, "query": CAT, "documents": docs, "return_documents": True})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["relevance_score"] for x in results] == sorted((x["relevance_score"] for x in results), reverse=True)
        assert all(x["document"] == {"text": docs[x["index"]]} for x in results)
        scores[model] = {x["index"]: x["relevance_score"] for x in results}
    assert all(abs(scores[RERANK][i] - scores[RERANK_GGUF][i]) < 1e-3 for i in range(len(docs))), scores


def test_rerank_with_an_embedding_model_ranks_by_cosine(client: TestClient) -> None:
    docs = [STOCKS, KITTEN, TEXTS[4]]
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = client.post(path, json={"model": EMBED_GGUF, "query": CAT, "documents": docs, "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2 and results[0]["index"] == 1 and "document" not in results[0]
        want = cosine(*vectors(client, EMBED_GGUF, [CAT, KITTEN]))
        assert abs(results[0]["relevance_score"] - want) < 1e-4


def test_rerank_without_a_name_prefers_a_cross_encoder(client: TestClient) -> None:
    r = client.post("/v1/rerank", json={"query": CAT, "documents": [KITTEN, STOCKS]})
    assert r.status_code == 200 and r.json()["model"] in (RERANK, RERANK_GGUF)


# -- the model manager --------------------------------------------------------------------------
def test_listed_loaded_and_unloaded(client: TestClient) -> None:
    listed = {m["id"]: m for m in client.get("/v1/model/embedding/list").json()["data"]}
    assert set(listed) == {EMBED, EMBED_GGUF, RERANK, RERANK_GGUF}
    assert listed[EMBED_GGUF]["default"] and listed[EMBED_GGUF]["backend"] == "llamacpp_embedding"
    assert listed[EMBED]["backend"] == "infinity" and listed[RERANK]["task"] == "rerank"
    assert listed[EMBED_GGUF]["pooling"] == "mean" and listed[EMBED_GGUF]["dimensions"] == 384
    assert client.get("/v1/model/embedding").json()["id"] == EMBED_GGUF
    r = client.post("/v1/model/embedding/load", json={"embedding_model_name": MODEL_NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "embedding_model_name"
    all_models = {m["id"] for m in client.get("/v1/model/list").json()["data"]}
    assert {EMBED, EMBED_GGUF, MODEL_NAME} <= all_models

    assert client.post("/v1/model/embedding/unload", json={"embedding_model_name": RERANK_GGUF}).json() == {
        "unloaded": [RERANK_GGUF]}
    assert client.post("/v1/rerank", json={"model": RERANK_GGUF, "query": "q", "documents": ["a"]}).status_code == 404
    r = client.post("/api/embed", json={"model": RERANK_GGUF, "input": "x"})  # Ollama loads on demand...
    assert r.status_code == 400 and "rerank" in r.json()["error"]  # ...and a reranker gives no vectors
    assert RERANK_GGUF in client.app.state.models.loaded


def test_keep_alive_zero_unloads_after_the_request(client: TestClient) -> None:
    models = client.app.state.models
    r = client.post("/api/embed", json={"model": EMBED, "input": CAT, "keep_alive": 0})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while EMBED in models.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert EMBED not in models.loaded and MODEL_NAME in models.loaded
    r = client.post("/api/embed", json={"model": EMBED, "input": CAT})  # comes back on demand
    assert r.status_code == 200 and r.json()["load_duration"] > 0


def test_least_recently_used_embedding_model_makes_room(tmp_path: Path) -> None:
    """With room for one embedding model, loading another unloads the idle one; chat models are not counted."""
    from endpoints.app import create_app

    models_dir = make_embedding_models(tmp_path / "models", rerank=False)
    config = make_config(tmp_path, models_dir, network={"disable_auth": True}, model={"model_name": None},
                         embeddings={"embedding_model_name": EMBED_GGUF, "max_loaded_embedding_models": 1})
    with TestClient(create_app(config)) as c:
        deadline = time.monotonic() + 60
        while c.get("/v1/model/embedding").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.post("/api/embed", json={"model": EMBED, "input": CAT}).status_code == 200
        assert list(c.app.state.models.loaded) == [EMBED]
        r = c.post("/v1/embeddings", json={"input": CAT})  # the default (first) embedding model comes back
        assert r.status_code == 200 and r.json()["model"] == EMBED


async def test_decoder_model_embeds_with_its_cache_cleared(model_path: Path) -> None:
    """A decoder (SmolLM2 with last-token pooling) runs through llama_decode: sequences stay apart in one
    pass, and the KV cache is cleared between passes, so a text's vector does not depend on its company."""
    from backends.base import LoadOptions
    from backends.embedding import EmbedInput
    from backends.llamacpp.embedding import LlamaCppEmbeddingEngine

    engine = await asyncio.to_thread(LlamaCppEmbeddingEngine.load, model_path, "smol", LoadOptions(pooling="last"))
    try:
        assert engine.pooling == "last" and engine.native.mem and engine.dimensions == 576

        def inputs(texts: list[str]) -> list[EmbedInput]:
            return [EmbedInput(tuple(engine.tokenize(t, add_bos=True, special=True)), t) for t in texts]

        together = (await engine.embed(inputs(TEXTS))).vectors
        again = (await engine.embed(inputs(TEXTS))).vectors
        for i, text in enumerate(TEXTS):
            alone = (await engine.embed(inputs([text]))).vectors[0]
            assert cosine(together[i], alone) > 0.999 and cosine(again[i], alone) > 0.999
        assert cosine(together[0], together[2]) < 0.999  # different texts, different vectors
    finally:
        await engine.close()
