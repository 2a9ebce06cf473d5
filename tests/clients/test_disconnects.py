"""Clients that leave mid-request over a real socket free their slots (streaming and not)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import MODEL_NAME, LiveServer


def _idle(server: LiveServer, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(server.base_url + "/health", timeout=5).json()["models"][MODEL_NAME]
        if stats["slots_active"] == 0 and stats["queue_depth"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"slots still busy: {stats}")
        time.sleep(0.1)


def test_streaming_and_plain_clients_that_leave_free_their_slots(live_server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {live_server.keys.api}"}
    body = {"prompt": "Tell me a long story.", "max_tokens": 60, "temperature": 0.8, "ignore_eos": True}

    async def streamer(client: httpx.AsyncClient, i: int) -> str:
        async with client.stream("POST", "/v1/completions", json={**body, "seed": i, "stream": True}) as r:
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if i % 3 == 0 and chunks >= 3:
                        return "left"  # closing the stream here drops the connection
                if line == "data: [DONE]":
                    return "done"
        return "truncated"

    async def plain_leaver(client: httpx.AsyncClient) -> str:
        try:
            await client.post("/v1/completions", json={**body, "max_tokens": 2000}, timeout=0.5)
        except httpx.TimeoutException:
            return "left"
        return "finished"

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=live_server.base_url, headers=headers, timeout=120) as client:
            return await asyncio.gather(*(streamer(client, i) for i in range(12)), plain_leaver(client), plain_leaver(client))

    outcomes = asyncio.run(run())
    assert outcomes[:12].count("done") == 8 and outcomes[:12].count("left") == 4
    stats = _idle(live_server)
    assert stats["kv_cells_used"] == 0
    r = httpx.post(live_server.base_url + "/v1/completions", headers=headers, json={"prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200
