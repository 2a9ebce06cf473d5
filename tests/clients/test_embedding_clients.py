"""The real `openai` and `ollama` clients asking a live Parley for embeddings, over a loopback socket."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest

from tests.conftest import MODEL_FILE, MODEL_NAME, LiveServer, run_server
from tests.embedding_models import EMBED, EMBED_GGUF, cosine, make_embedding_models

pytest.importorskip("infinity_emb", reason="needs the embeddings extra: pip install '.[embeddings]'")

TEXTS = ["a cat sat on the mat", "a kitten rested on the rug", "quarterly stock market report"]


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("embed-live")
    models = make_embedding_models(tmp / "models", rerank=False)
    (models / MODEL_FILE).symlink_to(model_path)
    (tmp / "config.yml").write_text(
        f"embeddings:\n  embedding_model_name: {EMBED_GGUF}\n  max_loaded_embedding_models: 2\n"
    )
    with run_server(models, MODEL_NAME, tmp) as live:
        yield live
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.keys.api, max_retries=0)


@pytest.fixture(scope="module")
def oll(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.base_url, headers={"Authorization": f"Bearer {server.keys.api}"})


def test_openai_embeddings(oai: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    packed = oai.embeddings.create(model=EMBED_GGUF, input=TEXTS)
    plain = oai.embeddings.create(model=EMBED_GGUF, input=TEXTS, encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1, 2] and packed.model == EMBED_GGUF
    assert all(np.allclose(a.embedding, b.embedding, atol=1e-6) for a, b in zip(packed.data, plain.data))
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 0
    cat, kitten, stocks = (d.embedding for d in plain.data)
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    short = oai.embeddings.create(model=EMBED_GGUF, input="a cat", dimensions=32, encoding_format="float")
    assert len(short.data[0].embedding) == 32


def test_openai_errors_name_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=EMBED_GGUF, input=[])
    assert info.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=MODEL_NAME, input="x")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=EMBED_GGUF, input="x", dimensions=1000)
    assert info.value.body["param"] == "dimensions"


def test_ollama_embed_loads_infinity_on_demand_and_agrees(oll: ollama.Client, oai: openai.OpenAI) -> None:
    response = oll.embed(model=EMBED, input=TEXTS)
    assert len(response.embeddings) == 3 and response.model == EMBED and (response.load_duration or 0) > 0
    gguf = [d.embedding for d in oai.embeddings.create(model=EMBED_GGUF, input=TEXTS, encoding_format="float").data]
    assert min(cosine(a, b) for a, b in zip(response.embeddings, gguf)) >= 0.99
    legacy = oll.embeddings(model=EMBED_GGUF, prompt=TEXTS[0])
    assert cosine(legacy.embedding, gguf[0]) > 0.99999


def test_ollama_errors(oll: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        oll.embed(model=EMBED, input=[])
    assert info.value.status_code == 400 and "input" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        oll.embed(model=MODEL_NAME, input="x")
    assert info.value.status_code == 400 and "embeddings" in info.value.error
