"""One key's rate limit shared by two Parley front doors through a real redis-server, and what
happens when Redis stops mid-run (503 for limited keys, never a crash; back when Redis is)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from endpoints.http.ratelimit import Limits, Subject
from endpoints.http.ratelimit_redis import RedisLimitStore
from tests.conftest import MODEL_NAME, LiveServer, free_port, run_server
from tests.remote_fleet import RedisServer, front_door

LIMITED, FREE = "limited-key-0123456789", "free-key-0123456789"
ALLOWED = 3


class Doors:
    def __init__(self, fronts: list[LiveServer], redis: RedisServer) -> None:
        self.fronts = fronts
        self.redis = redis

    def ask(self, front: LiveServer, key: str) -> httpx.Response:
        return httpx.post(front.base_url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "smol", "prompt": "Hi", "max_tokens": 1}, timeout=60)


@pytest.fixture(scope="module")
def doors(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    tmp = tmp_path_factory.mktemp("limits")
    keys = tmp / "keys.yml"
    keys.write_text(
        'api_key: "api-key-0123456789"\nadmin_key: "admin-key-0123456789"\nkeys:\n'
        f"  - {{key: {LIMITED}, name: shared, requests_per_minute: {ALLOWED}}}\n"
        f"  - {{key: {FREE}, name: free, unlimited: true}}\n"
    )
    with ExitStack() as stack:
        (tmp / "up").mkdir()
        up = stack.enter_context(run_server(model_dir, MODEL_NAME, tmp / "up"))
        redis = RedisServer(tmp / "redis")
        redis.start()
        stack.callback(redis.stop)
        model = [{"name": "smol", "kind": "openai", "server": "parley", "replicas": [up.base_url],
                  "upstream_model": MODEL_NAME, "api_key_env": "UPSTREAM_KEY"}]
        fronts = [
            stack.enter_context(front_door(tmp / f"front{i}", model, env={"UPSTREAM_KEY": up.keys.api},
                                           limits={"store": redis.url}, keys_file=keys))
            for i in range(2)
        ]
        yield Doors(fronts, redis)


def test_two_front_doors_share_one_keys_limit(doors: Doors) -> None:
    """Six requests at once, three to each front door: exactly the three allowed pass."""
    with ThreadPoolExecutor(ALLOWED * 2) as pool:
        codes = list(pool.map(lambda i: doors.ask(doors.fronts[i % 2], LIMITED).status_code, range(ALLOWED * 2)))
    assert sorted(codes) == [200] * ALLOWED + [429] * ALLOWED, codes


def test_redis_stopped_mid_run_refuses_limited_keys_with_503_and_recovers(doors: Doors) -> None:
    doors.redis.stop()
    try:
        for front in doors.fronts:
            refused = doors.ask(front, LIMITED)
            assert refused.status_code == 503, refused.text
            assert "limit store" in refused.json()["error"]["message"]
            assert doors.ask(front, FREE).status_code == 200  # keys without limits never need Redis
    finally:
        doors.redis.start()  # same port; the buckets start full again (no persistence)
    deadline = time.monotonic() + 20
    while doors.ask(doors.fronts[0], LIMITED).status_code != 200:
        assert time.monotonic() < deadline, "the front door did not use Redis again once it was back"
        time.sleep(0.2)
    for front in doors.fronts:
        assert front.proc.poll() is None  # neither front door crashed


def test_fail_open_lets_limited_callers_through_when_redis_is_down() -> None:
    async def run() -> None:
        store = RedisLimitStore(f"redis://127.0.0.1:{free_port()}/0", fail_open=True)
        subject = Subject("key:x", "x", Limits(requests_per_minute=1))
        try:
            assert await store.admit(subject) is None
            assert await store.admit(subject) is None
            store.charge(Subject("key:x", "x", Limits(tokens_per_minute=5)), 3)  # logged, never raised
        finally:
            await store.close()

    asyncio.run(run())


def test_redis_buckets_refill_and_charge_tokens(tmp_path: Path) -> None:
    """The Lua scripts alone: one token bucket taken below zero by a charge refuses the next request."""
    redis = RedisServer(tmp_path)
    redis.start()

    async def run() -> None:
        store = RedisLimitStore(redis.url, window=60)
        subject = Subject("key:t", "t", Limits(tokens_per_minute=10))
        try:
            assert await store.admit(subject) is None
            store.charge(subject, 12)
            await asyncio.sleep(0.05)
            await asyncio.gather(*store._pending)
            refusal = await store.admit(subject)
            assert refusal is not None and refusal.kind.value == "tokens" and refusal.retry_after >= 1
        finally:
            await store.close()

    try:
        asyncio.run(run())
    finally:
        redis.stop()
