"""The replicas of one remote model: which one a request goes to, and which ones are left out.

Routing policies:
- least_outstanding: the replica with the fewest requests in flight (ties: the
  one that has served fewest);
- round_robin: each in turn;
- prefix_affinity: a consistent-hash ring (64 points per replica) over the
  prompt's leading `affinity_prefix_chars` characters, so prompts sharing a
  long system prompt land where it is already cached. The preferred replica is
  taken only while its load stays within `affinity_load_factor` times the mean
  (bounded-load hashing); past that the request goes to the least outstanding.

Health: a replica is left out while its last active check failed (`/health`,
which llama-server answers 503 while loading; Ollama's `/api/version`), and
for `eject_seconds` after a connection error or a 5xx (passive). When every
replica is left out, requests get a 503 until one comes back.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from dataclasses import dataclass, field

from backends.base import ReplicaStats

RING_POINTS = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")


@dataclass
class Replica:
    url: str
    index: int
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    ejections: int = 0
    healthy: bool = True  # the last active check answered
    ejected_until: float = 0.0
    latency_sum: float = 0.0  # seconds to the first byte of each answer
    latency_count: int = 0

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def stats(self) -> ReplicaStats:
        return ReplicaStats(self.url, self.in_flight, self.requests, self.errors, self.ejections,
                            self.healthy and time.monotonic() >= self.ejected_until, self.latency_sum,
                            self.latency_count)


@dataclass
class ReplicaPool:
    urls: tuple[str, ...]
    routing: str = "least_outstanding"
    max_inflight: int = 64
    eject_seconds: float = 10.0
    affinity_chars: int = 512
    load_factor: float = 1.25
    replicas: list[Replica] = field(init=False)
    _ring: list[tuple[int, int]] = field(init=False)
    _next: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.replicas = [Replica(url, i) for i, url in enumerate(self.urls)]
        self._ring = sorted((_hash(f"{url}#{k}"), i) for i, url in enumerate(self.urls) for k in range(RING_POINTS))

    # -- choosing ------------------------------------------------------------------
    def candidates(self, exclude: set[int] = frozenset()) -> list[Replica]:  # type: ignore[assignment]
        now = time.monotonic()
        return [r for r in self.replicas if r.index not in exclude and r.usable(now) and r.in_flight < self.max_inflight]

    def pick(self, affinity_key: str | None = None, exclude: set[int] = frozenset()) -> Replica | None:  # type: ignore[assignment]
        """The replica for the next request, or None when none can take it."""
        options = self.candidates(exclude)
        if not options:
            return None
        if self.routing == "round_robin":
            start = self._next
            self._next += 1
            return min(options, key=lambda r: (r.index - start) % len(self.replicas))
        if self.routing == "prefix_affinity" and affinity_key:
            preferred = self.preferred(affinity_key, options)
            total = sum(r.in_flight for r in options)
            bound = math.ceil(self.load_factor * (total + 1) / len(options))
            if preferred.in_flight + 1 <= bound:
                return preferred
        return min(options, key=lambda r: (r.in_flight, r.requests, r.index))

    def preferred(self, affinity_key: str, options: list[Replica]) -> Replica:
        """The first of `options` clockwise from the key's point on the ring."""
        allowed = {r.index for r in options}
        point = _hash(affinity_key[: self.affinity_chars])
        start = bisect.bisect_left(self._ring, (point, -1))
        for k in range(len(self._ring)):
            _, index = self._ring[(start + k) % len(self._ring)]
            if index in allowed:
                return self.replicas[index]
        return options[0]

    # -- accounting ------------------------------------------------------------------
    def begin(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.requests += 1

    def end(self, replica: Replica) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)

    def first_byte(self, replica: Replica, seconds: float) -> None:
        replica.latency_sum += seconds
        replica.latency_count += 1

    def fail(self, replica: Replica) -> None:
        """A connection error or a 5xx: leave the replica out for the cooldown."""
        replica.errors += 1
        now = time.monotonic()
        if now >= replica.ejected_until:
            replica.ejections += 1
        replica.ejected_until = now + self.eject_seconds

    def retry_after(self) -> int:
        """Whole seconds until a left-out replica is due back (at least 1)."""
        now = time.monotonic()
        waits = [r.ejected_until - now for r in self.replicas if r.healthy and r.ejected_until > now]
        return max(1, math.ceil(min(waits))) if waits else max(1, math.ceil(self.eject_seconds))

    def stats(self) -> list[ReplicaStats]:
        return [r.stats() for r in self.replicas]
