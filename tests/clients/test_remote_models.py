"""Remote models end to end: real Parley processes as upstreams behind a real Parley front door,
reached by the real OpenAI, Ollama and Kobold clients; routing, retries, a killed replica and a
client that leaves. Everything runs on loopback; no mocks."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from backends.remote.replicas import ReplicaPool
from tests.conftest import MODEL_NAME, LiveServer, run_server
from tests.remote_fleet import front_door

SYSTEM = "You are a terse assistant for a hardware shop. Answer in one short sentence. " * 3


class Fleet:
    def __init__(self, front: LiveServer, a: LiveServer, b: LiveServer, doomed: LiveServer, empty: LiveServer) -> None:
        self.front, self.a, self.b, self.doomed, self.empty = front, a, b, doomed, empty
        self.headers = front.keys.api_headers()

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.front.base_url + "/v1", api_key=self.front.keys.api, max_retries=0,
                             timeout=120)

    def replica_counts(self, model: str, series: str = "parley_replica_requests_total") -> dict[str, float]:
        text = httpx.get(self.front.base_url + "/metrics", headers=self.headers, timeout=10).text
        out = {}
        for m in re.finditer(rf'^{series}{{model="{model}",replica="([^"]+)"}} ([0-9.e+]+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out


@pytest.fixture(scope="module")
def fleet(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        dirs = {name: tmp / name for name in ("a", "b", "doomed", "empty", "front")}
        for d in dirs.values():
            d.mkdir()
        a = stack.enter_context(run_server(model_dir, MODEL_NAME, dirs["a"]))
        for name in ("b", "doomed", "empty"):  # one API key for every upstream
            shutil.copy(dirs["a"] / "api_tokens.yml", dirs[name] / "api_tokens.yml")
        b = stack.enter_context(run_server(model_dir, MODEL_NAME, dirs["b"]))
        doomed = stack.enter_context(run_server(model_dir, MODEL_NAME, dirs["doomed"]))
        (dirs["empty"] / "models").mkdir()
        empty = stack.enter_context(_empty_server(dirs["empty"]))

        def model(name: str, replicas: list[str], **kw: object) -> dict[str, object]:
            return {"name": name, "kind": "openai", "server": "parley", "replicas": replicas,
                    "upstream_model": MODEL_NAME, "api_key_env": "UPSTREAM_KEY", **kw}

        models = [
            model("fleet", [a.base_url, b.base_url]),
            model("rr", [a.base_url, b.base_url], routing="round_robin"),
            model("affine", [a.base_url, b.base_url], routing="prefix_affinity", affinity_prefix_chars=120),
            model("generic", [a.base_url], server="openai"),
            model("flaky", [empty.base_url, a.base_url], routing="round_robin", health_interval=0),
            model("victim", [doomed.base_url, b.base_url], routing="round_robin"),
            {"name": "olla", "kind": "ollama", "replicas": [b.base_url], "upstream_model": MODEL_NAME,
             "api_key_env": "UPSTREAM_KEY"},  # Parley speaks Ollama's native API too
        ]
        front = stack.enter_context(front_door(dirs["front"], models, env={"UPSTREAM_KEY": a.keys.api}))
        yield Fleet(front, a, b, doomed, empty)


def _empty_server(tmp: Path):  # noqa: ANN202 - a context manager
    """A Parley with no model: it answers generations with 503, a real upstream that refuses."""
    from tests.remote_fleet import front_door as _front

    return _front(tmp, [], model_dir=tmp / "models")


# -- each dialect's client through a remote model -----------------------------------------------
def test_openai_sdk_chat_stream_and_completion(fleet: Fleet) -> None:
    client = fleet.openai()
    chat = client.chat.completions.create(model="fleet", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0  # the upstream's own counts
    parts = []
    stream = client.chat.completions.create(model="fleet", messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) and usage is not None and usage.completion_tokens > 0
    done = client.completions.create(model="fleet", prompt="The capital of France is", max_tokens=6, temperature=0,
                                     logprobs=2)
    lp = done.choices[0].logprobs
    assert done.choices[0].text and lp is not None and len(lp.tokens) == len(lp.token_logprobs) > 0
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_openai_tools_pass_through(fleet: Fleet) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    reply = fleet.openai().chat.completions.create(
        model="fleet", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40, temperature=0,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_ollama_client_chat_and_generate(fleet: Fleet) -> None:
    client = ollama.Client(host=fleet.front.base_url, headers=fleet.headers)
    names = [m.model for m in client.list().models]
    assert "fleet:latest" in names
    reply = client.chat(model="fleet", messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 8, "temperature": 0})
    assert reply.message.content and reply.eval_count and reply.prompt_eval_count
    chunks = list(client.generate(model="fleet", prompt="Once upon a time", raw=True, stream=True,
                                  options={"num_predict": 8, "temperature": 0}, keep_alive=0))
    assert "".join(c.response for c in chunks) and chunks[-1].done
    assert "fleet:latest" in [m.model for m in client.ps().models]  # keep_alive 0 does not unload a remote model


def test_kobold_generate_and_stream(fleet: Fleet) -> None:
    base, h = fleet.front.base_url, fleet.headers
    body = {"model": "fleet", "prompt": "Once upon a time", "max_length": 8, "temperature": 0.01, "rep_pen": 1.1}
    r = httpx.post(base + "/api/v1/generate", json=body, headers=h, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["text"]
    events = []
    with httpx.stream("POST", base + "/api/extra/generate/stream", json=body, headers=h, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert "".join(e.get("token", "") for e in events)


def test_an_ollama_upstream_behind_the_openai_dialect(fleet: Fleet) -> None:
    client = fleet.openai()
    chat = client.chat.completions.create(model="olla", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="olla", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text
    with pytest.raises(openai.BadRequestError) as err:  # Ollama gives no logprobs: refused, naming the field
        client.completions.create(model="olla", prompt="Hi", max_tokens=2, logprobs=2)
    assert "logprobs" in str(err.value)


# -- what Parley enforces and maps ------------------------------------------------------------------
def test_stop_strings_past_the_upstreams_limit_are_enforced_here(fleet: Fleet) -> None:
    client = fleet.openai()
    prompt = "List the days of the week: Monday, Tuesday,"
    full = client.completions.create(model="generic", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    word = next(w for w in re.findall(r"[A-Za-z]{4,}", full))
    # A plain OpenAI upstream takes four stop strings; the fifth is Parley's to enforce.
    stops = ["<<none1>>", "<<none2>>", "<<none3>>", "<<none4>>", word]
    cut = client.completions.create(model="generic", prompt=prompt, max_tokens=16, temperature=0,
                                    stop=stops)
    assert word not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    banned = client.completions.create(model="generic", prompt=prompt, max_tokens=16, temperature=0,
                                       extra_body={"banned_strings": [word.upper()]})
    assert word.lower() not in banned.choices[0].text.lower()


def test_upstream_refusal_is_a_4xx_and_token_ids_are_refused(fleet: Fleet) -> None:
    client = fleet.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fleet", prompt="word " * 3000, max_tokens=4)
    assert "context" in str(err.value).lower()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fleet", prompt="Hi", max_tokens=4, logit_bias={"15": -100})
    assert "logit_bias" in str(err.value)


# -- routing -------------------------------------------------------------------------------------
def test_round_robin_spreads_over_both_replicas(fleet: Fleet) -> None:
    before = fleet.replica_counts("rr")
    client = fleet.openai()
    for _ in range(4):
        client.completions.create(model="rr", prompt="Hello", max_tokens=1)
    after = fleet.replica_counts("rr")
    assert {url: after[url] - before.get(url, 0) for url in after} == {fleet.a.base_url: 2, fleet.b.base_url: 2}


def test_prefix_affinity_sends_a_shared_prefix_to_one_replica(fleet: Fleet) -> None:
    urls = (fleet.a.base_url, fleet.b.base_url)
    ring = ReplicaPool(urls, "prefix_affinity", affinity_chars=120)
    # Two prefixes the ring puts on different replicas (found here, as the server's ring is the same).
    prefixes = [f"Shop {i}. {SYSTEM}" for i in range(40)]
    home = {p: ring.preferred(p, ring.replicas).url for p in prefixes}
    first = prefixes[0]
    other = next(p for p in prefixes if home[p] != home[first])
    client = fleet.openai()
    for prefix in (first, other):
        before = fleet.replica_counts("affine")
        for q in ("Do you sell drills?", "Opening hours?", "Do you deliver?"):
            client.completions.create(model="affine", prompt=f"{prefix}\nQ: {q}\nA:", max_tokens=1)
        after = fleet.replica_counts("affine")
        moved = {url: after[url] - before.get(url, 0) for url in after}
        assert moved[home[prefix]] == 3, moved


def test_a_replica_answering_503_is_retried_elsewhere(fleet: Fleet) -> None:
    client = fleet.openai()
    for _ in range(3):
        reply = client.completions.create(model="flaky", prompt="Hello", max_tokens=2)
        assert reply.choices[0].text is not None
    errors = fleet.replica_counts("flaky", "parley_replica_errors_total")
    assert errors[fleet.empty.base_url] >= 1 and errors[fleet.a.base_url] == 0


# -- faults --------------------------------------------------------------------------------------
def _active_upstream_slots(server: LiveServer) -> int:
    body = httpx.get(server.base_url + "/health", timeout=10).json()
    return sum(m.get("slots_active", 0) for m in body["models"].values())


def test_a_client_that_leaves_frees_the_upstream_slot(fleet: Fleet) -> None:
    h = fleet.headers
    body = {"model": "fleet", "prompt": "Write a long story about a dragon.", "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", fleet.front.base_url + "/v1/completions", json=body, headers=h, timeout=60) as s:
        lines = s.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data:") for x in got)
        assert _active_upstream_slots(fleet.a) + _active_upstream_slots(fleet.b) == 1
    deadline = time.monotonic() + 20
    while _active_upstream_slots(fleet.a) + _active_upstream_slots(fleet.b):
        assert time.monotonic() < deadline, "the upstream kept generating for a client that left"
        time.sleep(0.1)
    assert sum(fleet.replica_counts("fleet", "parley_replica_in_flight").values()) == 0


def test_a_replica_killed_mid_stream(fleet: Fleet) -> None:
    """The stream that was on it ends with an error frame; the next requests succeed on the other."""
    h = fleet.headers
    body = {"model": "victim", "prompt": "Write a long story about a dragon.", "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    frames = []
    with httpx.stream("POST", fleet.front.base_url + "/v1/completions", json=body, headers=h, timeout=60) as s:
        for line in s.iter_lines():
            if not line:
                continue
            frames.append(line)
            if len(frames) == 4:
                assert fleet.replica_counts("victim", "parley_replica_in_flight")[fleet.doomed.base_url] == 1
                fleet.doomed.proc.kill()
    assert any('"error"' in f for f in frames[-2:]), frames[-3:]
    client = fleet.openai()
    for _ in range(3):
        assert client.completions.create(model="victim", prompt="Hello", max_tokens=2).choices[0].text is not None
