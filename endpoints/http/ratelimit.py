"""Per-caller rate limits: requests and tokens (generated, or read by embeddings) per minute.

Each caller (an API key, or a client address when auth is off) has up to two
token buckets that refill continuously:

- requests: holds `requests_per_minute` and refills at that rate; a request
  takes one, and is refused while the bucket holds less than one.
- tokens: holds `tokens_per_minute` and refills at that rate; a finished
  request takes the completion tokens it actually generated, or the input
  tokens an embedding or rerank request read (the balance may go below
  zero), and a new request is refused while less than one token is left.
  A request is never cut short by this limit; the next one waits.

A full bucket allows a burst of a minute's worth at once; after that the
steady rate applies. Refusals carry the whole seconds until a retry can
succeed (at least 1), for the `Retry-After` header.

Where the buckets live is a `LimitStore`: `MemoryLimitStore` (this process;
the default) or `RedisLimitStore` (ratelimit_redis.py: one Redis shared by
several Parley instances behind a load balancer, `limits.store: redis://...`).
`limit_store.build_limit_store` picks one from the config.

Pure logic: the clock is injected, nothing here knows about HTTP.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

WINDOW_SECONDS = 60.0
PRUNE_EVERY = 1024  # new callers between two sweeps of idle (full) buckets


class LimitKind(str, Enum):
    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True)
class Limits:
    """Per-minute limits; None means no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass(frozen=True)
class Subject:
    """Who is limited: a stable id (never the secret itself), a display name and the limits."""

    id: str
    name: str
    limits: Limits


@dataclass(frozen=True)
class Refusal:
    kind: LimitKind
    retry_after: int  # whole seconds, >= 1
    limit: int

    def message(self, name: str) -> str:
        what = ("requests per minute" if self.kind is LimitKind.REQUESTS
                else "tokens per minute (generated, or read by embeddings)")
        return (
            f"Rate limit reached for '{name}': {self.limit} {what}. "
            f"Retry in {self.retry_after} s, or ask the server's operator for a higher limit."
        )


class TokenBucket:
    """Capacity `capacity`, refilled at `capacity` per `window` seconds; the level may go negative."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float, window: float = WINDOW_SECONDS) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / window
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.updated = now

    def resize(self, capacity: int, window: float = WINDOW_SECONDS) -> None:
        """New limits (the keys file changed): keep what was used, up to the new capacity."""
        self.capacity = float(capacity)
        self.rate = capacity / window
        self.level = min(self.level, self.capacity)

    def seconds_until_one(self) -> int:
        """Whole seconds until the bucket holds one unit again (at least 1)."""
        missing = 1.0 - self.level
        return max(1, math.ceil(missing / self.rate - 1e-9))

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


class _State:
    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None


def _bucket(current: TokenBucket | None, limit: int | None, now: float) -> TokenBucket | None:
    if limit is None:
        return None
    if current is None:
        return TokenBucket(limit, now)
    current.refill(now)
    if current.capacity != limit:
        current.resize(limit)
    return current


class RateLimiter:
    """The buckets of every caller seen; thread-safe; one per app."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}
        self._new_since_prune = 0

    def __len__(self) -> int:
        return len(self._states)

    def _state(self, subject: Subject, now: float) -> _State:
        state = self._states.get(subject.id)
        if state is None:
            self._new_since_prune += 1
            if self._new_since_prune >= PRUNE_EVERY:
                self._prune(now)
            state = self._states[subject.id] = _State()
        limits = subject.limits
        state.requests = _bucket(state.requests, limits.requests_per_minute, now)
        state.tokens = _bucket(state.tokens, limits.tokens_per_minute, now)
        return state

    def _prune(self, now: float) -> None:
        """Forget callers whose buckets have refilled: they behave exactly like new ones."""
        self._new_since_prune = 0
        for key in list(self._states):
            state = self._states[key]
            buckets = [b for b in (state.requests, state.tokens) if b is not None]
            for b in buckets:
                b.refill(now)
            if all(b.full for b in buckets):
                del self._states[key]

    def admit(self, subject: Subject) -> Refusal | None:
        """Take one request from the caller's budget, or say why not and for how long."""
        if subject.limits.unlimited:
            return None
        with self._lock:
            now = self._clock()
            state = self._state(subject, now)
            tokens, requests = state.tokens, state.requests
            if tokens is not None and tokens.level < 1:
                return Refusal(LimitKind.TOKENS, tokens.seconds_until_one(), int(tokens.capacity))
            if requests is not None:
                if requests.level < 1:
                    return Refusal(LimitKind.REQUESTS, requests.seconds_until_one(), int(requests.capacity))
                requests.level -= 1
            return None

    def charge(self, subject: Subject, tokens: int) -> None:
        """Count tokens a finished request generated (or embedded) against the caller's token budget."""
        if tokens <= 0 or subject.limits.tokens_per_minute is None:
            return
        with self._lock:
            state = self._state(subject, self._clock())
            assert state.tokens is not None
            state.tokens.level -= tokens

    def remaining(self, subject: Subject) -> dict[LimitKind, float]:
        """What is left in each of the caller's buckets now (for tests and diagnostics)."""
        with self._lock:
            state = self._state(subject, self._clock())
            out: dict[LimitKind, float] = {}
            if state.requests is not None:
                out[LimitKind.REQUESTS] = state.requests.level
            if state.tokens is not None:
                out[LimitKind.TOKENS] = state.tokens.level
            return out


class LimitStore(Protocol):
    """Where the buckets live. `admit` may await a shared store; `charge` returns at once."""

    async def admit(self, subject: Subject) -> Refusal | None:
        """Take one request from the caller's budget, or say why not (raises a 503 APIError when the
        store cannot be reached and the store is not configured to fail open)."""
        ...

    def charge(self, subject: Subject, tokens: int) -> None:
        """Count tokens a finished request generated (in the background for a shared store)."""
        ...

    async def close(self) -> None: ...


class MemoryLimitStore:
    """The buckets in this process (`limits.store: memory`)."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()

    async def admit(self, subject: Subject) -> Refusal | None:
        return self.limiter.admit(subject)

    def charge(self, subject: Subject, tokens: int) -> None:
        self.limiter.charge(subject, tokens)

    def remaining(self, subject: Subject) -> dict[LimitKind, float]:
        return self.limiter.remaining(subject)

    async def close(self) -> None:
        return None

