"""llama.cpp's /completion and /slots: request mapping (pure) and wire framing over a scripted FakeEngine.

The real app serves a FakeEngine (tests/fake_engine.py), so the frames, the
result objects, the error envelope and a failure mid-stream are checked
without llama.cpp; tests/api/test_llamacpp_completion.py runs the real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import BadRequestError
from endpoints.llamacpp.completion_mapping import apply_sampler_order, logit_bias_of, samplers_of
from tests.fake_engine import FakeEngine, FakeServer, fail, fake_app

ANSWER = ["Hello", " world", ", how", " are", " you?"]
FAILURE = "scripted engine failure: out of cheese"
# What llama-server's result and stream frames carry (tools/server, PROTOCOLS.md "llama.cpp native").
RESULT_FIELDS = {"index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
                 "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word",
                 "tokens_cached", "timings"}
FRAME_FIELDS = {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"}
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
           "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    def engine() -> FakeEngine:
        return FakeEngine(default=ANSWER, scripts={"please fail": ["Half an", " answer", fail(FAILURE)]})

    with fake_app(tmp_path, monkeypatch, engine) as s:
        yield s


def frames(body: str) -> list[dict[str, Any]]:
    assert body.endswith("\n\n") and "[DONE]" not in body, body[-200:]
    out = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        out.append(json.loads(block[len("data: "):]))
    return out


# -- mapping ------------------------------------------------------------------------------------
def test_samplers_by_name_alias_and_letter() -> None:
    assert samplers_of(["penalties", "top-k", "typical", "nucleus", "min_p", "temp", "tfs_z"]) == (
        ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"], ["tfs_z"])
    assert samplers_of("kpt") == (["top_k", "top_p", "temperature"], [])


def test_samplers_left_out_are_off_and_the_temperature_goes_where_the_list_puts_it() -> None:
    sent: dict[str, Any] = {"top_k": 40, "min_p": 0.1}
    notes: list[str] = []
    apply_sampler_order(sent, ["temperature", "top_k", "top_p"], notes)
    assert sent["top_k"] == 40 and sent["min_p"] == 0.0 and sent["repetition_penalty"] == 1.0
    assert sent["dry_multiplier"] == 0.0 and sent["xtc_probability"] == 0.0 and sent["temperature_last"] is False
    assert notes == []
    sent, notes = {}, []
    apply_sampler_order(sent, ["min_p", "top_k", "temperature"], notes)
    assert sent["temperature_last"] is True and "temperature" not in sent
    assert notes and "applied as ['top_k', 'min_p']" in notes[0]
    sent, notes = {"temperature": 0.7}, []
    apply_sampler_order(sent, ["top_k"], notes)
    assert sent["temperature"] == 1.0  # no temperature sampler: the raw distribution, as llama.cpp samples it


def test_logit_bias_shapes() -> None:
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    bias, banned = logit_bias_of({"5": 2.5, "ab": False, "9": -200}, 100, tokenize)
    assert bias == {5: 2.5} and banned == {97, 98, 9}
    bias, banned = logit_bias_of([[5, 1.0], ["c", -1], [7, False], [500, 3]], 100, tokenize)
    assert bias == {5: 1.0, 99: -1.0} and banned == {7}  # 500 is outside the vocabulary: skipped
    for bad in ([[5]], "x", [[5, "high"]], {"5": [1]}):
        with pytest.raises(BadRequestError) as info:
            logit_bias_of(bad, 100, tokenize)
        assert info.value.param == "logit_bias"


# -- framing ------------------------------------------------------------------------------------
def test_result_object_carries_llama_server_fields(server: FakeServer) -> None:
    r = server.client.post("/completion", json={"prompt": "Hi", "n_predict": 50, "n_probs": 1,
                                                 "return_tokens": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert RESULT_FIELDS | {"completion_probabilities"} <= set(body)
    assert body["content"] == "".join(ANSWER) and body["stop"] is True and body["stop_type"] == "eos"
    assert TIMINGS <= set(body["timings"]) and body["tokens"] and body["prompt"] == "Hi"
    entry = body["completion_probabilities"][0]
    assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
    assert set(entry["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}
    assert server.engine.requests[-1].params.logprobs == 1


def test_stream_frames_then_the_result_without_done(server: FakeServer) -> None:
    r = server.client.post("/completion", json={"prompt": "Hi", "stream": True, "n_probs": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    out = frames(r.text)
    pieces, last = out[:-1], out[-1]
    assert all(FRAME_FIELDS <= set(f) and f["stop"] is False for f in pieces)
    assert all(f["completion_probabilities"] for f in pieces)
    assert "".join(f["content"] for f in pieces) == "".join(ANSWER)
    assert RESULT_FIELDS <= set(last) and last["stop"] is True and last["content"] == ""
    assert last["stop_type"] == "eos" and "completion_probabilities" not in last


def test_n_choices_are_a_list_and_streamed_by_index(server: FakeServer) -> None:
    r = server.client.post("/completion", json={"prompt": "Hi", "n": 2})
    assert [c["index"] for c in r.json()] == [0, 1]
    r = server.client.post("/completion", json={"prompt": ["Hi", "Ho"]})
    assert [(c["index"], c["prompt"]) for c in r.json()] == [(0, "Hi"), (1, "Ho")]
    out = frames(server.client.post("/completion", json={"prompt": "Hi", "n": 2, "stream": True}).text)
    assert sorted(f["index"] for f in out if f["stop"]) == [0, 1]
    for i in (0, 1):
        assert "".join(f["content"] for f in out if f["index"] == i and not f["stop"]) == "".join(ANSWER)


def test_stop_word_limit_and_prompt_only(server: FakeServer) -> None:
    word = server.client.post("/completion", json={"prompt": "Hi", "stop": [" are"]}).json()
    assert (word["content"], word["stop_type"], word["stopping_word"]) == ("Hello world, how", "word", " are")
    limit = server.client.post("/completion", json={"prompt": "Hi", "n_predict": 2}).json()
    assert limit["stop_type"] == "limit" and limit["tokens_predicted"] == 2
    only = server.client.post("/completion", json={"prompt": "Hi", "n_predict": 0}).json()
    assert (only["content"], only["tokens_predicted"], only["stop_type"]) == ("", 0, "limit")
    assert only["tokens_evaluated"] > 0 and only["generation_settings"]["n_predict"] == 0


def test_engine_failure_mid_stream_is_a_final_error_frame(server: FakeServer) -> None:
    r = server.client.post("/completion", json={"prompt": "please fail", "stream": True})
    assert r.status_code == 200
    out = frames(r.text)
    assert "".join(f.get("content", "") for f in out[:-1]) == "Half an answer"
    error = out[-1]["error"]
    assert error["code"] == 500 and error["type"] == "server_error" and FAILURE in error["message"]
    assert not any(f.get("stop") for f in out), "no result frame after a failure"


def test_errors_take_llama_servers_envelope(server: FakeServer) -> None:
    r = server.client.post("/completion", json={"prompt": "Hi", "n_predict": "abc"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and error["param"] == "n_predict"
    assert "n_predict" in error["message"]
    for body, param in (({"n_predict": 3}, "prompt"), ({"prompt": "Hi", "logit_bias": 5}, "logit_bias"),
                        ({"prompt": "Hi", "grammar": "root ::= ("}, "grammar"),
                        ({"prompt": [1.5]}, "prompt"), ({"prompt": "Hi", "dry_sequence_breakers": []},
                                                        "dry_sequence_breakers"),
                        ({"prompt": ["a", "b"], "stream": True}, "prompt")):
        r = server.client.post("/completion", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), (body, r.text)
    r = server.client.post("/slots/0?action=erase")
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def test_slots_from_the_engine_counters(server: FakeServer) -> None:
    r = server.client.get("/slots")
    assert r.status_code == 200, r.text
    slots = r.json()
    assert [s["id"] for s in slots] == list(range(server.engine.slots))
    for slot in slots:
        assert {"id", "id_task", "n_ctx", "speculative", "is_processing", "params", "next_token"} <= set(slot)
        assert slot["is_processing"] is False and "prompt" not in slot
        assert {"has_next_token", "has_new_line", "n_remain", "n_decoded", "stopping_word"} <= set(slot["next_token"][0])
        assert slot["params"]["temperature"] == 0.8 and slot["params"]["n_ctx"] == server.engine.info.n_ctx
    r = server.client.get("/slots", params={"model": "any-name"})
    assert r.status_code == 200 and len(r.json()) == len(slots)  # a one-model server answers to any name
    server.client.post("/v1/model/unload", json={})
    r = server.client.get("/slots")
    assert r.status_code == 503 and r.json()["error"] == {
        "code": 503, "type": "unavailable_error", "param": r.json()["error"]["param"],
        "message": r.json()["error"]["message"]}
