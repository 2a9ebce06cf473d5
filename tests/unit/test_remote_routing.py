"""Remote models, pure logic: replica routing and ejection, the upstream field table, answer re-framing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from backends.base import ChatInput, GenerationRequest
from backends.remote.replicas import ReplicaPool
from backends.remote.spec import RemoteSpec
from backends.remote.wire import AnswerReader, build_call
from backends.sampling import SamplingParams
from common.errors import BadRequestError

URLS = ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")


def _run(pool: ReplicaPool, keys: list[str | None]) -> Counter[int]:
    seen: Counter[int] = Counter()
    for key in keys:
        replica = pool.pick(key)
        assert replica is not None
        pool.begin(replica)
        pool.end(replica)
        seen[replica.index] += 1
    return seen


def test_round_robin_takes_each_in_turn() -> None:
    pool = ReplicaPool(URLS, "round_robin")
    assert _run(pool, [None] * 9) == {0: 3, 1: 3, 2: 3}


def test_least_outstanding_prefers_the_idle_replica() -> None:
    pool = ReplicaPool(URLS)
    busy = pool.replicas[0]
    pool.begin(busy)
    pool.begin(busy)
    picked = [pool.pick() for _ in range(2)]
    assert busy not in picked
    assert _run(ReplicaPool(URLS), [None] * 6) == {0: 2, 1: 2, 2: 2}  # ties spread by requests served


def test_prefix_affinity_keeps_a_prefix_on_one_replica_and_spreads_others() -> None:
    pool = ReplicaPool(URLS, "prefix_affinity", affinity_chars=64)
    system = "You are a helpful assistant. " * 4
    same = _run(pool, [system + f"question {i}" for i in range(10)])
    assert len(same) == 1  # the key is the first 64 characters: one replica holds that prefix
    spread = _run(pool, [f"{i} distinct prompt" for i in range(60)])
    assert len(spread) == 3


def test_prefix_affinity_falls_back_when_its_replica_is_over_the_load_bound() -> None:
    pool = ReplicaPool(URLS[:2], "prefix_affinity", load_factor=1.25)
    key = "shared system prompt"
    home = pool.pick(key)
    assert home is not None
    for _ in range(2):
        pool.begin(home)  # two in flight there, none elsewhere: bound ceil(1.25 * 3 / 2) = 2
    other = pool.pick(key)
    assert other is not None and other is not home
    pool.end(home)
    assert pool.pick(key) is home


def test_a_failed_replica_is_ejected_for_its_cooldown() -> None:
    pool = ReplicaPool(URLS[:2], eject_seconds=60)
    pool.fail(pool.replicas[0])
    assert {pool.pick().index for _ in range(4)} == {1}  # type: ignore[union-attr]
    pool.fail(pool.replicas[1])
    assert pool.pick() is None
    assert pool.retry_after() >= 59
    stats = pool.stats()
    assert [s.ejections for s in stats] == [1, 1] and not any(s.healthy for s in stats)


def test_max_inflight_caps_each_replica() -> None:
    pool = ReplicaPool(URLS[:1], max_inflight=1)
    pool.begin(pool.replicas[0])
    assert pool.pick() is None


def _spec(**kw: object) -> RemoteSpec:
    return RemoteSpec(name="m", kind=str(kw.pop("kind", "openai")), replicas=URLS[:1], upstream_model="up", **kw)  # type: ignore[arg-type]


def _request(params: SamplingParams, chat: bool = False, spec: object = None) -> GenerationRequest:
    return GenerationRequest(
        [1], params, prompt_text="Hello", constraint_spec=spec,  # type: ignore[arg-type]
        chat=ChatInput(({"role": "user", "content": "hi"},)) if chat else None,
    )


class _Spec:
    def __init__(self, kind: str, source: str) -> None:
        self.kind, self.source = kind, source


def test_vllm_gets_its_samplers_and_structured_outputs() -> None:
    params = SamplingParams(temperature=0.5, top_k=20, min_p=0.1, repetition_penalty=1.1, top_a=0.3,
                            stop=("END",), banned_strings=("bad",))
    call = build_call(_spec(server="vllm"), _request(params, spec=_Spec("regex", "[0-9]+")), 16)
    body = call.body
    assert call.path == "/v1/completions" and body["prompt"] == "Hello" and body["max_tokens"] == 16
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (20, 0.1, 1.1)
    assert "top_a" not in body  # dropped: vLLM has no top-a
    assert body["stop"] == ["END", "bad"]  # a banned string ends the output upstream too
    assert body["structured_outputs"] == {"regex": "[0-9]+"}


def test_plain_openai_refuses_what_it_cannot_do() -> None:
    with pytest.raises(BadRequestError) as err:
        build_call(_spec(server="openai"), _request(SamplingParams(), spec=_Spec("regex", "a")), None)
    assert err.value.param == "regex_pattern"
    with pytest.raises(BadRequestError) as err:
        build_call(_spec(server="openai", strict_sampling=True), _request(SamplingParams(top_k=5)), None)
    assert err.value.param == "top_k"
    many = SamplingParams(stop=("a", "b", "c", "d", "e"))
    assert build_call(_spec(server="openai"), _request(many), None).body["stop"] == ["a", "b", "c", "d"]


def test_ollama_options_and_refusals() -> None:
    call = build_call(_spec(kind="ollama"), _request(SamplingParams(top_k=3, repetition_penalty=1.2), chat=True), 8)
    assert call.path == "/api/chat" and call.ndjson
    assert call.body["options"] == {"top_k": 3, "repeat_penalty": 1.2, "temperature": 1.0, "num_predict": 8}
    with pytest.raises(BadRequestError) as err:
        build_call(_spec(kind="ollama"), _request(SamplingParams(logprobs=2)), 8)
    assert err.value.param == "logprobs"


def test_chat_tool_call_stream_becomes_hermes_text() -> None:
    reader = AnswerReader(chat=True, ndjson=False)
    chunks = [
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}},
    ]
    pieces = [reader.read(c) for c in chunks]
    text = "".join(p.text for p in pieces)
    assert text == '<think>hmm</think><tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>'
    body = text.split("<tool_call>\n", 1)[1].split("\n</tool_call>")[0]
    assert json.loads(body) == {"name": "get", "arguments": {"city": "Paris"}}
    assert pieces[4].finish == "tool_calls" and pieces[5].prompt_tokens == 7
