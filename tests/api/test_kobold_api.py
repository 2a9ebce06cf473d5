"""KoboldAI API (KoboldCpp compatible) through the real SmolLM2 model, in-process."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backends.base import (
    Event,
    Finished,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
    Usage,
)
from common.errors import ServiceUnavailableError
from endpoints.kobold.genkeys import AbortOutcome, GenRegistry
from endpoints.kobold.mapping import KOBOLD_DEFAULTS, sent_fields, to_sampling_params
from endpoints.kobold.protocol import GenerateRequest
from tests.conftest import MODEL_NAME, Keys, make_config
from tests.fake_engine import ScriptedHandle

GENERATE = "/api/v1/generate"
STREAM = "/api/extra/generate/stream"
COUNTING = "1, 2, 3, 4, 5,"


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post(GENERATE, json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"]
    assert len(result) == 1
    return result[0]


def kobold_frames(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event, data) pairs."""
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        frames.append((fields["event"], json.loads(fields["data"])))
    return frames


# -- info routes -------------------------------------------------------------------
def test_info_routes(client: TestClient) -> None:
    assert client.get("/api/v1/model").json() == {"result": f"koboldcpp/{MODEL_NAME}"}
    assert client.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    version = client.get("/api/extra/version").json()
    assert version["result"] == "KoboldCpp"
    assert tuple(int(x) for x in version["version"].split(".")) >= (1, 80)
    assert version["protected"] is True
    assert version["txt2img"] is False and version["embeddings"] is False
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 2048}
    assert client.get("/api/extra/true_max_context_length").json() == {"value": 2048}
    assert client.get("/api/v1/config/max_length").json() == {"value": 512}


# -- generation ----------------------------------------------------------------------
def test_generate_returns_text_and_counts(client: TestClient) -> None:
    prompt = "The capital of France is"
    result = generate(client, prompt=prompt, max_length=12, temperature=0)
    assert result["text"].strip()
    assert result["finish_reason"] in ("stop", "length")
    assert 0 < result["completion_tokens"] <= 12
    counted = client.post("/api/extra/tokencount", json={"prompt": prompt}).json()["value"]
    assert result["prompt_tokens"] == counted


def test_sillytavern_payload_is_accepted(client: TestClient) -> None:
    """Every field SillyTavern's Kobold client sends, including ones not applied (grammar has its own tests)."""
    body = {
        "prompt": "Once upon a time", "max_context_length": 2048, "max_length": 8, "rep_pen": 1.1,
        "rep_pen_range": 320, "rep_pen_slope": 0.7, "temperature": 0.7, "tfs": 1, "top_a": 0, "top_k": 40,
        "top_p": 0.9, "min_p": 0.05, "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "use_world_info": False, "singleline": False, "stop_sequence": ["\nUser:"], "streaming": False,
        "can_abort": True, "mirostat": 2, "mirostat_tau": 5, "mirostat_eta": 0.1,
        "use_default_badwordsids": True, "grammar": "", "sampler_seed": 7, "n": 1,
        "dynatemp_range": 0.2, "dynatemp_exponent": 1, "smoothing_factor": 0, "dry_multiplier": 0.8,
        "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 0,
        "dry_sequence_breakers": ["\n", ":"], "xtc_threshold": 0.1, "xtc_probability": 0.5,
        "banned_tokens": ["dragon"], "logit_bias": {"19556": -5}, "presence_penalty": 0.1,
        "images": [], "quiet": True, "api_server": "http://127.0.0.1:5000/api",
    }
    result = generate(client, **body)
    assert result["completion_tokens"] == 8  # EOS is banned, so it runs to max_length
    assert result["finish_reason"] == "length"


def test_sampler_seed_reproduces(client: TestClient) -> None:
    body = {"prompt": "Once upon a time", "max_length": 20, "temperature": 1.0, "top_k": 0, "top_p": 1}
    # Warm the prompt's cache first: a reused prefix computed in another batch shape can flip a
    # borderline token by float rounding, so compared runs must start from the same cache state.
    generate(client, **body, sampler_seed=1)
    first = generate(client, **body, sampler_seed=1234)["text"]
    second = generate(client, **body, sampler_seed=1234)["text"]
    assert first == second and first.strip()


def test_stop_sequence_cuts_and_trim_stop(client: TestClient) -> None:
    trimmed = generate(client, prompt=COUNTING, max_length=24, temperature=0, stop_sequence=["8"])
    assert trimmed["finish_reason"] == "stop"
    assert "8" not in trimmed["text"] and "7" in trimmed["text"]
    kept = generate(client, prompt=COUNTING, max_length=24, temperature=0, stop_sequence=["8"], trim_stop=False)
    assert kept["text"] == trimmed["text"] + "8"


def test_max_context_length_truncates_from_the_left(client: TestClient) -> None:
    prompt = "Tell me a story about a cat. " * 60
    count = client.post("/api/extra/tokencount", json={"prompt": prompt}).json()["value"]
    assert count > 300
    result = generate(client, prompt=prompt, max_context_length=96, max_length=8, temperature=0)
    assert 0 < result["prompt_tokens"] <= 96 - 8
    assert result["completion_tokens"] <= 8
    # max_length that fills the budget is lowered, as KoboldCpp does, leaving a prompt of one token.
    squeezed = generate(client, prompt=prompt, max_context_length=8, max_length=16, temperature=0)
    assert squeezed["prompt_tokens"] == 1 and squeezed["completion_tokens"] <= 7


def test_stream_frames(client: TestClient) -> None:
    body = {"prompt": COUNTING, "max_length": 24, "temperature": 0, "stop_sequence": ["8"]}
    with client.stream("POST", STREAM, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert "[DONE]" not in raw
    frames = kobold_frames(raw)
    assert all(event == "message" for event, _ in frames)
    assert all(set(data) == {"token", "finish_reason"} for _, data in frames)
    assert [d["finish_reason"] for _, d in frames[:-1]] == [None] * (len(frames) - 1)
    assert frames[-1][1]["finish_reason"] == "stop"
    streamed = "".join(d["token"] for _, d in frames)
    assert streamed == generate(client, **body)["text"]


# -- generation control: grammar, banned strings, presets ---------------------------------
YES_NO = 'root ::= "yes" | "no"'
LIST_GRAMMAR = 'root ::= "[" word (", " word){0,3} "]"\nword ::= [a-z]{1,6}'


def stream_text(client: TestClient, body: dict[str, Any]) -> tuple[str, str]:
    with client.stream("POST", STREAM, json=body) as r:
        assert r.status_code == 200
        frames = kobold_frames(r.read().decode())
    return "".join(d["token"] for _, d in frames), frames[-1][1]["finish_reason"]


@pytest.mark.parametrize(("grammar", "pattern"), [
    (YES_NO, r"yes|no"),
    (LIST_GRAMMAR, r"\[[a-z]{1,6}(, [a-z]{1,6}){0,3}\]"),
])
def test_grammar_always_matches_streamed_and_not(client: TestClient, grammar: str, pattern: str) -> None:
    for seed in range(4):
        body = {"prompt": "Question: is the sky green?\nAnswer:", "max_length": 40, "temperature": 1.2,
                "sampler_seed": seed, "grammar": grammar}
        result = generate(client, **body)
        assert re.fullmatch(pattern, result["text"]), result
        assert result["finish_reason"] == "stop"
        text, finish = stream_text(client, body)
        assert text == result["text"] and finish == "stop"


def test_empty_grammar_is_unconstrained_and_a_bad_one_is_400(client: TestClient) -> None:
    assert generate(client, prompt=COUNTING, max_length=6, temperature=0, grammar="")["text"].strip()
    r = client.post(GENERATE, json={"prompt": "Hi", "max_length": 4, "grammar": 'root ::= ('})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail["param"] == "grammar" and "'grammar'" in detail["msg"] and "Fix the GBNF grammar" in detail["msg"]


def test_banned_tokens_never_appear(client: TestClient) -> None:
    body = {"prompt": "My favourite colour is blue. The sky is blue and the sea is", "max_length": 30,
            "temperature": 1.0}
    # The ban below has something to prevent: some seed writes it.
    assert any("sea" in generate(client, **body, sampler_seed=s)["text"] for s in range(10))
    for seed in range(10):
        text = generate(client, **body, sampler_seed=seed, banned_tokens=["sea"])["text"]
        assert "sea" not in text, text


def test_forced_preset_beats_the_request(client: TestClient) -> None:
    body = {"prompt": "Once upon a time", "max_length": 16, "temperature": 1.5, "sampler_seed": 5}
    # Warm the prompt's cache first: a reused prefix computed in another batch shape can flip a
    # borderline token by float rounding, so compared runs must start from the same cache state.
    generate(client, **{**body, "temperature": 0})
    greedy = generate(client, **{**body, "temperature": 0})["text"]
    assert generate(client, **body)["text"] != greedy  # temperature 1.5 alone wanders off
    try:
        r = client.post("/v1/sampling/override/switch",
                        json={"overrides": {"temperature": {"override": 0.0, "force": True}}})
        assert r.status_code == 200, r.text
        assert generate(client, **body)["text"] == greedy
    finally:
        client.post("/v1/sampling/override/unload")


# -- tokens ------------------------------------------------------------------------------
def test_tokencount_and_detokenize_round_trip(client: TestClient) -> None:
    text = "Hello there, how are you today?"
    counted = client.post("/api/extra/tokencount", json={"prompt": text}).json()
    assert counted["value"] == len(counted["ids"]) > 3
    assert client.post("/api/extra/tokenize", json={"prompt": text}).json() == counted
    back = client.post("/api/extra/detokenize", json={"ids": counted["ids"]}).json()
    assert back == {"result": text, "success": True}
    bad = client.post("/api/extra/detokenize", json={"ids": [10**9]})
    assert bad.status_code == 400 and bad.json()["detail"]["param"] == "ids"


# -- genkeys: check and abort ---------------------------------------------------------------
def test_check_returns_the_generation_text_to_its_owner_only(
    client: TestClient, app_env: tuple[TestClient, Keys]
) -> None:
    result = generate(client, prompt=COUNTING, max_length=6, temperature=0, genkey="KCPPcheck1")
    checked = client.post("/api/extra/generate/check", json={"genkey": "KCPPcheck1"}).json()
    assert checked == {"results": [{"text": result["text"]}]}
    assert client.get("/api/extra/generate/check").json() == checked  # no genkey: the latest
    # Another key cannot read it.
    other = {"Authorization": f"Bearer {app_env[1].api}"}
    hidden = client.post("/api/extra/generate/check", json={"genkey": "KCPPcheck1"}, headers=other).json()
    assert hidden == {"results": [{"text": ""}]}
    assert client.post("/api/extra/generate/check", json={"genkey": "unknown"}).json() == {"results": [{"text": ""}]}


def test_abort_answers_like_koboldcpp(client: TestClient) -> None:
    unknown = client.post("/api/extra/abort", json={"genkey": "KCPPnone"})
    assert unknown.status_code == 200 and unknown.json() == {"success": "false", "done": "false"}
    generate(client, prompt=COUNTING, max_length=4, temperature=0, genkey="KCPPdone")
    finished = client.post("/api/extra/abort", json={"genkey": "KCPPdone"}).json()
    assert finished == {"success": "false", "done": "true"}
    assert client.post("/api/extra/abort").json() == {"success": "false", "done": "true"}


# -- errors in the Kobold shape -------------------------------------------------------------
def test_validation_error_is_422_naming_the_field(client: TestClient) -> None:
    r = client.post(GENERATE, json={"prompt": "Hi", "max_length": 0})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["param"] == "max_length" and "max_length" in detail["msg"]
    r = client.post(GENERATE, json={"prompt": "Hi", "max_length": 4, "logit_bias": {"abc": 1}})
    assert r.status_code == 400 and r.json()["detail"]["param"] == "logit_bias"
    r = client.post(STREAM, json={"prompt": "Hi", "n": 2})
    assert r.status_code == 400 and r.json()["detail"]["param"] == "n"


def test_missing_or_wrong_key_is_401_in_kobold_shape(client: TestClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key"}):
        r = client.post(GENERATE, json={"prompt": "Hi"}, headers=headers)
        assert r.status_code == 401
        detail = r.json()["detail"]
        assert detail["type"] == "invalid_api_key" and "api_tokens.yml" in detail["msg"]


def test_no_model_loaded_is_503_in_kobold_shape(model_dir: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    app = create_app(make_config(tmp_path, model_dir), load_model_on_startup=False)
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {Keys(tmp_path / 'api_tokens.yml').api}"
        for r in (c.get("/api/v1/model"), c.post(GENERATE, json={"prompt": "Hi"})):
            assert r.status_code == 503
            assert r.json()["detail"]["type"] == "model_not_loaded"
            assert "/v1/model/load" in r.json()["detail"]["msg"]
        assert c.get("/api/extra/nowhere").json()["detail"]["type"] == "not_found"


def test_busy_is_503_in_kobold_shape(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = client.app.state.models.get().engine

    def busy(request: GenerationRequest) -> GenerationHandle:
        raise ServiceUnavailableError("The server is busy. Retry shortly.", retry_after=1, code="server_busy")

    monkeypatch.setattr(engine, "submit", busy)
    for path in (GENERATE, STREAM):
        r = client.post(path, json={"prompt": "Hi", "max_length": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"]["type"] == "server_busy"


def test_mid_stream_failure_ends_with_an_error_frame(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = client.app.state.models.get().engine
    script: list[Event] = [TextDelta("Hel"), Finished(FinishReason.ERROR, Usage(), error="decode failed")]
    monkeypatch.setattr(engine, "submit", lambda request: ScriptedHandle(request, script))
    with client.stream("POST", STREAM, json={"prompt": "Hi", "max_length": 4}) as r:
        frames = kobold_frames(r.read().decode())
    assert frames[0] == ("message", {"token": "Hel", "finish_reason": None})
    event, data = frames[-1]
    assert event == "error" and data["detail"]["msg"] == "decode failed"
    assert data["detail"]["type"] == "engine_error"


# -- pure logic -------------------------------------------------------------------------
def test_mapping_of_kobold_specific_fields() -> None:
    body = GenerateRequest(
        temperature=0.8, dynatemp_range=1.0, sampler_seed=-1, use_default_badwordsids=True, bypass_eos=True,
        banned_tokens=["foo", ""], stop_sequence="###", render_special=True, logit_bias={"5": -1.5},
    )
    p = to_sampling_params(body, n_vocab=100, default_length=10)
    assert (p.min_temp, p.max_temp) == (0.0, 1.8)
    assert p.seed is None and p.ban_eos_token and p.ignore_eos and p.max_tokens == 10
    assert p.banned_strings == ("foo",) and p.stop == ("###",)
    assert p.skip_special_tokens is False and p.logit_bias == {5: -1.5}
    assert to_sampling_params(GenerateRequest(sampler_seed=42), n_vocab=100, default_length=1).seed == 42


def test_sent_fields_are_only_what_the_client_sent() -> None:
    from common.models.presets import Preset

    assert sent_fields(GenerateRequest(prompt="x", grammar=""), n_vocab=100) == {}
    sent = sent_fields(GenerateRequest(temperature=0.5, rep_pen=1.2, max_length=7, sampler_seed=3), n_vocab=100)
    assert sent == {"temperature": 0.5, "repetition_penalty": 1.2, "max_tokens": 7, "seed": 3}
    # KoboldCpp's defaults fill what was not sent; a preset beats them but not the request.
    assert (KOBOLD_DEFAULTS["temperature"], KOBOLD_DEFAULTS["top_k"], KOBOLD_DEFAULTS["top_p"]) == (0.75, 100, 0.92)
    preset = Preset.from_mapping("p", {"top_k": 5, "temperature": 0.1})
    p = to_sampling_params(GenerateRequest(temperature=0.5), n_vocab=100, default_length=9, preset=preset)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.penalty_range) == (0.5, 5, 0.92, 9, 320)


async def test_registry_prunes_and_bounds() -> None:
    now = [0.0]
    reg = GenRegistry(keep_seconds=10, max_entries=3, clock=lambda: now[0])
    params = to_sampling_params(GenerateRequest(), n_vocab=9, default_length=1)
    handle = ScriptedHandle(GenerationRequest([1], params), [])
    done = reg.start("a", "k1", [handle])
    reg.finish(done)
    running = reg.start("a", "k2", [handle])
    assert reg.find("a", None) is running and reg.find("b", "k2") is None
    now[0] = 11.0
    assert reg.find("a", "k1") is None  # finished too long ago
    assert await reg.abort("b", "k2") is AbortOutcome.UNKNOWN
    assert await reg.abort("a", None, wait=0.01) is AbortOutcome.ABORTED and handle.cancelled
    for i in range(5):
        reg.start("c", f"x{i}", [handle])
    assert len(reg) == 3
