"""FIM over the wire: the openai SDK's `suffix`, and llama.cpp's /infill, /tokenize, /detokenize.

One server serves the FIM copy of SmolLM2 (see tests/unit/test_fim.py); the
session's live server serves the plain model, which has no FIM tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, LiveServer, run_server
from tests.unit.test_fim import FIM_FILE, FIM_IDS, FIM_NAME, fim_copy

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`python main.py` with a model directory holding only the FIM copy."""
    gguf_path = fim_copy(tmp_path_factory)
    model_dir = tmp_path_factory.mktemp("fim-only")
    (model_dir / FIM_FILE).symlink_to(gguf_path)
    tmp = tmp_path_factory.mktemp("fim-live")
    with run_server(model_dir, FIM_NAME, tmp, max_seq_len=512) as server:
        yield server
    shutil.rmtree(tmp, ignore_errors=True)


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.keys.api, max_retries=0)


def post(server: LiveServer, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.keys.api_headers(), timeout=60, **kw)


def tokens_of(server: LiveServer, text: str) -> list[int]:
    r = post(server, "/tokenize", {"content": text, "parse_special": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# -- /v1/completions with suffix ---------------------------------------------------
def test_sdk_suffix_fills_the_middle(fim_server: LiveServer) -> None:
    r = sdk(fim_server).completions.create(
        model=FIM_NAME, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 6
    expected = len(FIM_IDS) + len(tokens_of(fim_server, PREFIX)) + len(tokens_of(fim_server, SUFFIX))
    assert r.usage.prompt_tokens == expected


def test_sdk_suffix_stream(fim_server: LiveServer) -> None:
    stream = sdk(fim_server).completions.create(
        model=FIM_NAME, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_suffix_takes_one_text_prompt(fim_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fim_server).completions.create(model=FIM_NAME, prompt=["a", "b"], suffix="c", max_tokens=2)
    assert "suffix" in exc.value.message
    r = post(fim_server, "/v1/completions", {"prompt": [1, 2, 3], "suffix": "x", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_sdk_suffix_on_a_model_without_fim(live_server: LiveServer) -> None:
    client = sdk(live_server)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL_NAME, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
    assert "FIM" in exc.value.message and "suffix" in exc.value.message
    assert exc.value.body["param"] == "suffix"  # type: ignore[index]
    # An empty suffix (sent by some clients on every request) stays a plain completion.
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", suffix="", max_tokens=4)
    assert r.choices[0].text


# -- /infill ---------------------------------------------------------------------
INFILL = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, "temperature": 0, "seed": 1}


def test_infill(fim_server: LiveServer) -> None:
    r = post(fim_server, "/infill", INFILL)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["content"], str) and body["stop"] is True
    assert body["stop_type"] in ("eos", "limit", "word")
    assert 1 <= body["tokens_predicted"] <= 8
    assert body["stop_type"] != "limit" or body["tokens_predicted"] == 8
    assert body["tokens_evaluated"] == 3 + len(tokens_of(fim_server, PREFIX)) + len(tokens_of(fim_server, SUFFIX))
    assert body["model"] == FIM_NAME and body["generation_settings"]["temperature"] == 0


def test_infill_prompt_goes_after_the_middle_token(fim_server: LiveServer) -> None:
    body = post(fim_server, "/infill", {**INFILL, "prompt": "a +", "n_predict": 2}).json()
    base = 3 + len(tokens_of(fim_server, PREFIX)) + len(tokens_of(fim_server, SUFFIX))
    assert body["tokens_evaluated"] == base + len(tokens_of(fim_server, "a +"))
    assert body["stop_type"] in ("eos", "limit", "word")


def test_infill_stream_matches(fim_server: LiveServer) -> None:
    whole = post(fim_server, "/infill", INFILL).json()
    frames: list[dict[str, Any]] = []
    with httpx.stream("POST", fim_server.base_url + "/infill", json={**INFILL, "stream": True},
                      headers=fim_server.keys.api_headers(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(json.loads(line[6:]))
    assert frames and frames[-1]["stop"] is True and all(f["stop"] is False for f in frames[:-1])
    assert "".join(f["content"] for f in frames) == whole["content"]
    assert frames[-1]["stop_type"] == whole["stop_type"]
    assert frames[-1]["tokens_predicted"] == whole["tokens_predicted"]


def test_infill_errors(fim_server: LiveServer, live_server: LiveServer) -> None:
    r = post(live_server, "/infill", INFILL)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input_suffix" and "FIM" in error["message"]
    r = post(fim_server, "/infill", {**INFILL, "n_predict": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"
    r = httpx.post(fim_server.base_url + "/infill", json=INFILL, timeout=10)
    assert r.status_code == 401 and "error" in r.json()


# -- /tokenize, /detokenize ----------------------------------------------------------
TEXT = "Hello world, déjà vu 龘"


def test_tokenize_detokenize_round_trip(live_server: LiveServer) -> None:
    r = post(live_server, "/tokenize", {"content": TEXT})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    r = post(live_server, "/detokenize", {"tokens": tokens})
    assert r.status_code == 200 and r.json() == {"content": TEXT}


def test_tokenize_with_pieces(live_server: LiveServer) -> None:
    plain = post(live_server, "/tokenize", {"content": TEXT}).json()["tokens"]
    pieces = post(live_server, "/tokenize", {"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == TEXT
    assert any(isinstance(p["piece"], list) for p in pieces)  # 龘 splits into byte pieces


def test_tokenize_special_tokens(live_server: LiveServer) -> None:
    special = post(live_server, "/tokenize", {"content": "<|im_start|>"}).json()["tokens"]
    assert len(special) == 1
    literal = post(live_server, "/tokenize", {"content": "<|im_start|>", "parse_special": False}).json()["tokens"]
    assert len(literal) > 1
    assert post(live_server, "/detokenize", {"tokens": special}).json()["content"] == "<|im_start|>"


def test_detokenize_rejects_unknown_ids(live_server: LiveServer) -> None:
    r = post(live_server, "/detokenize", {"tokens": [1, 10**9]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tokens" and "/tokenize" in r.json()["error"]["message"]
