"""Images through every dialect, in-process with the real model and a synthetic projector; each bad input is a 4xx
in the dialect's shape naming the field; an encoder failure mid-stream is an error frame."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import MODEL_FILE, MODEL_NAME, Keys, make_config, wait_loaded
from tests.fixtures.vision import VISION_MODEL, sample_image, vision_model_dir

B64 = [base64.b64encode(sample_image(seed)).decode() for seed in range(4)]


def data_uri(i: int) -> str:
    return "data:image/png;base64," + B64[i]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("www")
    (root / "cat.png").write_bytes(sample_image(0))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    )
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def vc(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with a vision model (default) and the plain text model beside it, admin key sent."""
    from endpoints.app import create_app

    models = vision_model_dir(tmp_path_factory.mktemp("vmodels"), model_path)
    (models / MODEL_FILE).symlink_to(model_path)
    tmp = tmp_path_factory.mktemp("vapp")
    config = make_config(
        tmp, models,
        model={"model_name": VISION_MODEL, "max_seq_len": 1024, "max_loaded_models": 2, "inline_model_loading": True},
        limits={"max_images_per_request": 3, "max_image_pixels": 200_000},
        vision={"remote_image_allowed_hosts": ["127.0.0.1"]},
    )
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        client.headers.update({"Authorization": f"Bearer {Keys(tmp / 'api_tokens.yml').admin}"})
        yield client


def chat_body(*images: str, text: str = "What is in this picture?", **extra: object) -> dict[str, object]:
    parts: list[dict[str, object]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url, "detail": "low"}} for url in images]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 10, "temperature": 0, **extra}


def content(r: object) -> str:
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    return r.json()["choices"][0]["message"]["content"]  # type: ignore[attr-defined]


def test_models_props_and_cards_show_vision(vc: TestClient) -> None:
    listed = {m["id"]: m for m in vc.get("/v1/models").json()["data"]}
    assert listed[VISION_MODEL]["modalities"] == ["text", "vision"]
    assert listed[MODEL_NAME]["modalities"] == ["text"]
    assert vc.get("/props").json()["modalities"] == {"vision": True, "audio": False}
    assert "vision" in vc.post("/api/show", json={"model": VISION_MODEL}).json()["capabilities"]
    card = vc.get("/v1/model").json()
    assert card["modalities"] == ["text", "vision"] and card["parameters"]["mmproj"].endswith(".gguf")


def test_openai_images_by_data_uri_and_url(vc: TestClient, image_server: str) -> None:
    a = content(vc.post("/v1/chat/completions", json=chat_body(data_uri(0))))
    b = content(vc.post("/v1/chat/completions", json=chat_body(data_uri(1))))
    assert a != b
    by_url = content(vc.post("/v1/chat/completions", json=chat_body(f"{image_server}/cat.png")))
    assert by_url == a  # the same bytes, so the same prompt: served from the cache, exactly as the first
    r = vc.post("/v1/chat/completions", json=chat_body(data_uri(2), stream=True))
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_ollama_and_kobold_images(vc: TestClient) -> None:
    r = vc.post("/api/chat", json={"model": VISION_MODEL, "stream": False, "options": {"num_predict": 8},
                                   "messages": [{"role": "user", "content": "What is this?", "images": [B64[0]]}]})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"]
    for raw in (False, True):
        r = vc.post("/api/generate", json={"model": VISION_MODEL, "prompt": "Describe it.", "images": [B64[1]],
                                           "raw": raw, "stream": False, "options": {"num_predict": 8}})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_eval_count"] > 16
    r = vc.post("/api/v1/generate", json={"prompt": "Picture: ", "images": [B64[2]], "max_length": 8})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["text"]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/chat/completions", chat_body("data:image/png;base64,###"), "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions", chat_body("data:image/png;base64," + base64.b64encode(b"plain text").decode()),
         "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions",
         chat_body("data:image/png;base64," + base64.b64encode(sample_image(0)[:300]).decode()),
         "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions", chat_body(*[data_uri(i) for i in range(4)]), "messages[0].content[4].image_url.url"),
        ("/v1/chat/completions",
         chat_body("data:image/png;base64," + base64.b64encode(sample_image(0, size=(600, 400))).decode()),
         "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions", chat_body("http://127.0.0.2:9/x.png"), "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions", chat_body("http://169.254.169.254/latest/meta-data/"),
         "messages[0].content[1].image_url.url"),
        ("/v1/chat/completions", {**chat_body(data_uri(0)), "model": MODEL_NAME}, "messages[0].content[1].image_url.url"),
        ("/api/chat", {"model": VISION_MODEL, "stream": False,
                       "messages": [{"role": "user", "content": "x", "images": ["%%%"]}]}, "messages[0].images[0]"),
        ("/api/chat", {"model": MODEL_NAME, "stream": False,
                       "messages": [{"role": "user", "content": "x", "images": [B64[0]]}]}, "messages[0].images[0]"),
        ("/api/generate", {"model": VISION_MODEL, "prompt": "x", "stream": False,
                           "images": [base64.b64encode(b"GIF89a broken").decode()]}, "images[0]"),
        ("/api/v1/generate", {"prompt": "x", "images": ["not base64!"]}, "images[0]"),
        ("/api/v1/generate", {"prompt": "x", "images": [B64[0]] * 4}, "images[3]"),
    ],
)
def test_bad_images_are_4xx_naming_the_field(vc: TestClient, route: str, body: dict[str, object], field: str) -> None:
    r = vc.post(route, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text, r.text


def test_an_encoder_failure_mid_stream_is_an_error_frame(vc: TestClient) -> None:
    import hashlib

    engine = vc.app.state.models.get(VISION_MODEL).engine  # type: ignore[attr-defined]
    digest = hashlib.sha256(sample_image(3)).hexdigest()
    engine.encoder.fail_if = lambda key: key.startswith(digest)
    try:
        r = vc.post("/v1/chat/completions", json=chat_body(data_uri(3), stream=True))
    finally:
        engine.encoder.fail_if = None
    assert r.status_code == 200
    frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "could not be encoded" in frames[-1]["error"]["message"]
    assert content(vc.post("/v1/chat/completions", json=chat_body(data_uri(0)))).strip()  # the engine still serves
