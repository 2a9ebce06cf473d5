"""The rate-limit store the config names: `limits.store: memory` or a Redis URL."""

from __future__ import annotations

from endpoints.http.ratelimit import LimitStore, MemoryLimitStore


def build_limit_store(store: str, *, fail_open: bool = False) -> LimitStore:
    """`memory`, or a `redis://` / `rediss://` / `unix://` URL (needs the `redis` package: extra `fleet`)."""
    if store == "memory":
        return MemoryLimitStore()
    from endpoints.http.ratelimit_redis import RedisLimitStore

    return RedisLimitStore(store, fail_open=fail_open)
