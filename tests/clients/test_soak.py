"""Soak: 200 mixed requests at concurrency 16 against Parley started as users start it.

OpenAI chat and completions, Kobold generate and stream, Ollama chat and
generate, streaming and not; about a fifth of them leave early (mid-stream, or
by a client timeout). Afterwards nothing may be left behind: no busy slot, no
used KV cell, no queued request, no extra asyncio task, and the server's RSS
may not have grown more than 5% since the warm-up. Every answer that did
complete must be well-formed for its dialect.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_NAME, LiveServer, run_server

TOTAL, WARMUP, CONCURRENCY = 200, 30, 16
LEAVE_EARLY = 0.2
SHORT, LONG = 4, 64  # max tokens: a completed request / one the client leaves
PROMPTS = ["Name a colour.", "Say hi.", "Count to three.", "What is 2+2?", "Name a fruit.", "Greet a friend."]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- requests and their dialect's checks --------------------------------------------------------
def sse_json(lines: list[str]) -> list[Any]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def check_openai_chat(body: Any, stream_lines: list[str] | None) -> None:
    if stream_lines is None:
        assert body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
        return
    assert stream_lines[-1] == "data: [DONE]"
    chunks = sse_json(stream_lines)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])


def check_openai_completion(body: Any, stream_lines: list[str] | None) -> None:
    if stream_lines is None:
        assert body["object"] == "text_completion"
        assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert stream_lines[-1] == "data: [DONE]"
    chunks = sse_json(stream_lines)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def check_kobold(body: Any, stream_lines: list[str] | None) -> None:
    if stream_lines is None:
        result = body["results"][0]
        assert isinstance(result["text"], str) and result["finish_reason"] in ("stop", "length")
        return
    assert "event: message" in stream_lines
    frames = sse_json(stream_lines)
    assert all(isinstance(f["token"], str) for f in frames)
    assert frames[-1]["finish_reason"] in ("stop", "length")
    assert all(f["finish_reason"] is None for f in frames[:-1])


def check_ollama(body: Any, stream_lines: list[str] | None) -> None:
    objects = [body] if stream_lines is None else [json.loads(line) for line in stream_lines if line]
    assert all("error" not in o for o in objects)
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] in ("stop", "length")
    assert objects[-1]["eval_count"] >= 1 and all(o["done"] is False for o in objects[:-1])
    for o in objects:
        assert isinstance(o["message"]["content"] if "message" in o else o["response"], str)


def request_for(kind: str, stream: bool, max_tokens: int, prompt: str) -> tuple[str, dict[str, Any]]:
    messages = [{"role": "user", "content": prompt}]
    eos = {"ignore_eos": True} if max_tokens == LONG else {}
    if kind == "openai_chat":
        return "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "stream": stream, **eos}
    if kind == "openai_completion":
        return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, **eos}
    if kind == "kobold":
        path = "/api/extra/generate/stream" if stream else "/api/v1/generate"
        return path, {"prompt": prompt, "max_length": max_tokens, "bypass_eos": max_tokens == LONG, "quiet": True}
    options = {"num_predict": max_tokens}
    if kind == "ollama_chat":
        return "/api/chat", {"model": MODEL_NAME, "messages": messages, "stream": stream, "options": options}
    return "/api/generate", {"model": MODEL_NAME, "prompt": prompt, "stream": stream, "options": options}


CHECKS = {"openai_chat": check_openai_chat, "openai_completion": check_openai_completion, "kobold": check_kobold,
          "ollama_chat": check_ollama, "ollama_generate": check_ollama}


async def one(client: httpx.AsyncClient, rng: random.Random, tally: Counter[str], problems: list[str]) -> None:
    kind = rng.choice(list(CHECKS))
    stream = rng.random() < 0.5
    leave = rng.random() < LEAVE_EARLY
    path, body = request_for(kind, stream, LONG if leave else SHORT, rng.choice(PROMPTS))
    tally["requests"] += 1
    try:
        if stream:
            lines: list[str] = []
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200, (r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line:
                        continue  # the blank line that ends each event
                    lines.append(line)
                    if leave and line.startswith(("data: ", "{")):
                        tally["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
            CHECKS[kind](None, lines)
        else:
            timeout = httpx.Timeout(60, read=0.3) if leave else None
            try:
                r = await client.post(path, json=body, **({"timeout": timeout} if timeout else {}))
            except httpx.ReadTimeout:
                tally["disconnected"] += 1
                return
            assert r.status_code == 200, (r.status_code, r.text[:300])
            CHECKS[kind](r.json(), None)
        tally["completed"] += 1
    except Exception as exc:  # noqa: BLE001 - every failure is reported together
        tally["errors"] += 1
        problems.append(f"{kind} stream={stream} leave={leave}: {exc!r}"[:400])


async def phase(server: LiveServer, count: int, rng: random.Random, tally: Counter[str], problems: list[str]) -> None:
    headers = {"Authorization": f"Bearer {server.keys.api}"}
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated() -> None:
            async with gate:
                await one(client, rng, tally, problems)

        await asyncio.gather(*(gated() for _ in range(count)))


def settled(server: LiveServer, timeout: float = 30.0) -> dict[str, Any]:
    """/health once no slot, queue entry or KV cell is in use (cancellations finish within a step)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(server.base_url + "/health", timeout=10).json()
        stats = health["models"][MODEL_NAME]
        if (stats["slots_active"], stats["queue_depth"], stats["kv_cells_used"]) == (0, 0, 0):
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.2)


@pytest.fixture(scope="module")
def soak_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(model_dir, MODEL_NAME, tmp_path_factory.mktemp("soak")) as server:
        yield server


def test_soak_mixed_dialects_leaves_nothing_behind(soak_server: LiveServer) -> None:
    rng = random.Random(20261122)
    tally: Counter[str] = Counter()
    problems: list[str] = []
    pid = soak_server.proc.pid

    asyncio.run(phase(soak_server, WARMUP, rng, tally, problems))
    warm = settled(soak_server)
    rss_before, tasks_before = rss_kib(pid), warm["tasks"]

    asyncio.run(phase(soak_server, TOTAL - WARMUP, rng, tally, problems))
    end = settled(soak_server)
    rss_after, tasks_after = rss_kib(pid), end["tasks"]

    growth = (rss_after - rss_before) / rss_before
    print(f"\nsoak: {tally['requests']} requests, {tally['completed']} completed, {tally['disconnected']} left early, "
          f"{tally['errors']} errors; RSS {rss_before / 1024:.1f} MiB after warm-up -> {rss_after / 1024:.1f} MiB "
          f"({growth:+.2%}); asyncio tasks {tasks_before} -> {tasks_after}")
    assert not problems, "\n".join(problems[:10])
    assert tally["requests"] == TOTAL and tally["completed"] + tally["disconnected"] == TOTAL
    assert tally["disconnected"] >= TOTAL * LEAVE_EARLY / 2 and tally["completed"] >= TOTAL / 2
    stats = end["models"][MODEL_NAME]
    assert end["status"] == "healthy"
    assert (stats["slots_active"], stats["queue_depth"], stats["kv_cells_used"]) == (0, 0, 0), stats
    assert tasks_after <= tasks_before, (tasks_before, tasks_after)
    assert growth < 0.05, (rss_before, rss_after)
    assert soak_server.proc.poll() is None
