"""Rate-limit buckets in Redis, shared by every Parley instance that names the same server.

Each caller's bucket is a Redis hash (`level`, `updated`) refilled and taken
from inside one Lua script, so two front doors admitting the same key at the
same moment can never both take its last request. The script reads Redis's own
clock (TIME), so the instances' clocks need not agree. Keys expire once a
bucket would have refilled anyway.

When Redis cannot be reached, a limited caller gets a 503 naming the store
(or, with `limits.store_fail_open`, is let through); either way it is logged,
once per outage, and the server keeps running. Callers without limits never
touch Redis.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loguru import logger

from common.errors import ServiceUnavailableError
from endpoints.http.ratelimit import WINDOW_SECONDS, LimitKind, Refusal, Subject

# KEYS: requests bucket, tokens bucket. ARGV: requests cap (0: none), tokens cap (0: none), window seconds.
# Returns {kind, retry_after_seconds, cap}; kind "ok" when admitted.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[3])
local ttl = math.ceil(window * 2000)
local function refill(key, cap)
  local v = redis.call('HMGET', key, 'level', 'updated')
  local level, updated = tonumber(v[1]), tonumber(v[2])
  if level == nil or updated == nil then return cap end
  return math.min(cap, level + math.max(0, now - updated) * cap / window)
end
local function wait(level, cap)
  return math.max(1, math.ceil((1 - level) / (cap / window) - 1e-9))
end
local tcap = tonumber(ARGV[2])
if tcap > 0 then
  local level = refill(KEYS[2], tcap)
  redis.call('HSET', KEYS[2], 'level', level, 'updated', now)
  redis.call('PEXPIRE', KEYS[2], ttl)
  if level < 1 then return {'tokens', wait(level, tcap), tcap} end
end
local rcap = tonumber(ARGV[1])
if rcap > 0 then
  local level = refill(KEYS[1], rcap)
  if level < 1 then
    redis.call('HSET', KEYS[1], 'level', level, 'updated', now)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {'requests', wait(level, rcap), rcap}
  end
  redis.call('HSET', KEYS[1], 'level', level - 1, 'updated', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {'ok', 0, 0}
"""

# KEYS: tokens bucket. ARGV: cap, window seconds, tokens to take (the level may go below zero).
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, window, take = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'updated')
local level, updated = tonumber(v[1]), tonumber(v[2])
if level == nil or updated == nil then level = cap else
  level = math.min(cap, level + math.max(0, now - updated) * cap / window)
end
redis.call('HSET', KEYS[1], 'level', level - take, 'updated', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
return 1
"""

PREFIX = "parley:ratelimit:"
TIMEOUT_SECONDS = 0.5  # a limit check must not hold a request long when Redis is slow or gone


class RedisLimitStore:
    """Token buckets in Redis (`limits.store: redis://host:port/db`)."""

    def __init__(self, url: str, *, fail_open: bool = False, window: float = WINDOW_SECONDS) -> None:
        import redis.asyncio as redis

        self.url = url
        self.fail_open = fail_open
        self.window = window
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=TIMEOUT_SECONDS, socket_timeout=TIMEOUT_SECONDS,
            retry_on_timeout=False, health_check_interval=0,
        )
        self._admit = self._client.register_script(_ADMIT)
        self._charge = self._client.register_script(_CHARGE)
        self._pending: set[asyncio.Task[Any]] = set()
        self._down_since: float | None = None

    def _keys(self, subject: Subject) -> list[str]:
        return [f"{PREFIX}{subject.id}:requests", f"{PREFIX}{subject.id}:tokens"]

    async def admit(self, subject: Subject) -> Refusal | None:
        limits = subject.limits
        if limits.unlimited:
            return None
        try:
            kind, retry_after, cap = await self._admit(
                keys=self._keys(subject),
                args=[limits.requests_per_minute or 0, limits.tokens_per_minute or 0, self.window],
            )
        except Exception as exc:  # noqa: BLE001 - any store failure is an outage, never a crash
            return self._unavailable(subject, exc)
        self._recovered()
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "ok":
            return None
        return Refusal(LimitKind(kind), int(retry_after), int(cap))

    def charge(self, subject: Subject, tokens: int) -> None:
        cap = subject.limits.tokens_per_minute
        if tokens <= 0 or cap is None:
            return
        task = asyncio.get_running_loop().create_task(self._charge_now(subject, cap, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _charge_now(self, subject: Subject, cap: int, tokens: int) -> None:
        try:
            await self._charge(keys=self._keys(subject)[1:], args=[cap, self.window, tokens])
        except Exception as exc:  # noqa: BLE001
            logger.warning("Rate limits: could not charge {} tokens to '{}' in {} ({}); they go uncounted",
                           tokens, subject.name, self.url, exc)

    def _unavailable(self, subject: Subject, exc: BaseException) -> Refusal | None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            action = "letting limited callers through (limits.store_fail_open)" if self.fail_open else \
                "refusing limited callers with 503"
            logger.error("Rate limits: the limit store {} is unreachable ({}); {} until it is back",
                         self.url, exc or type(exc).__name__, action)
        if self.fail_open:
            return None
        raise ServiceUnavailableError(
            f"Rate limits for '{subject.name}' cannot be checked: the limit store ({self.url}) is unreachable. "
            "Retry in a few seconds; the operator should check that Redis is running.",
            retry_after=2, code="limit_store_unavailable",
        )

    def _recovered(self) -> None:
        if self._down_since is not None:
            logger.info("Rate limits: the limit store {} is back after {:.1f}s", self.url,
                        time.monotonic() - self._down_since)
            self._down_since = None

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._client.aclose()
