"""Images through the real `openai` and `ollama` clients, against Parley started as users start it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, run_server
from tests.fixtures.vision import VISION_MODEL, sample_image, vision_model_dir


@pytest.fixture(scope="module")
def vision_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models = vision_model_dir(tmp_path_factory.mktemp("vmodels"), model_path)
    with run_server(models, VISION_MODEL, tmp_path_factory.mktemp("vlive"), max_seq_len=1024) as server:
        yield server


def test_openai_client_sends_images(vision_server: LiveServer) -> None:
    import openai

    client = openai.OpenAI(base_url=vision_server.base_url + "/v1", api_key=vision_server.keys.api)
    models = client.models.list()
    assert any(getattr(m, "modalities", None) == ["text", "vision"] for m in models.data)
    answers = []
    for seed in (0, 1):
        url = "data:image/png;base64," + base64.b64encode(sample_image(seed)).decode()
        r = client.chat.completions.create(
            model=VISION_MODEL, max_tokens=10, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
            ]}],
        )
        answers.append(r.choices[0].message.content)
        assert r.usage is not None and r.usage.prompt_tokens > 16
    assert answers[0] != answers[1]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=VISION_MODEL, max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.1.2.3/a.png"}}]}],
        )
    assert "messages[0].content[0].image_url.url" in str(info.value)


def test_ollama_client_sends_images(vision_server: LiveServer) -> None:
    import ollama

    client = ollama.Client(host=vision_server.base_url, headers={"Authorization": f"Bearer {vision_server.keys.api}"})
    image = sample_image(2)
    r = client.chat(model=VISION_MODEL, messages=[{"role": "user", "content": "Describe it.", "images": [image]}],
                    options={"num_predict": 8, "temperature": 0})
    assert r.message.content
    g = client.generate(model=VISION_MODEL, prompt="Describe it.", images=[image], options={"num_predict": 8})
    assert g.response and g.prompt_eval_count and g.prompt_eval_count > 16
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=VISION_MODEL, messages=[{"role": "user", "content": "x", "images": [b"not an image"]}])
    assert info.value.status_code == 400
