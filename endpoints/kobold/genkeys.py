"""In-flight Kobold generations by genkey, for /api/extra/abort and /generate/check.

Each generation is registered under its owner and its genkey (the client's, or
one made up when the client sends none):

- the owner is who asked: a hash of the presented API key when auth is on
  (one key can neither peek at nor abort another key's generations), or the
  client's host when auth is off;
- a request without a genkey means "my most recent generation";
- finished entries stay readable for `keep_seconds` (clients poll /check right
  after the end) and are then dropped; at most `max_entries` are kept, the
  oldest going first, so a generation whose stream never started cannot leak.

The registry lives on `app.state` (see `get_registry`), never in a module global.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from fastapi import Request

from backends.base import GenerationHandle
from endpoints.http.auth import AuthManager

KEEP_SECONDS = 60.0
MAX_ENTRIES = 256
ABORT_WAIT_SECONDS = 2.0


@dataclass(eq=False)
class GenEntry:
    owner: str
    genkey: str
    handles: list[GenerationHandle]
    started: float
    parts: list[str] = field(default_factory=list)
    finished_at: float | None = None
    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def append(self, text: str) -> None:
        if text:
            self.parts.append(text)


class AbortOutcome(str, Enum):
    ABORTED = "aborted"  # a running generation was cancelled
    NOT_RUNNING = "not_running"  # known, but it had already finished (or none was running)
    UNKNOWN = "unknown"  # no generation with that genkey for this caller


class GenRegistry:
    def __init__(
        self,
        *,
        keep_seconds: float = KEEP_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_seconds = keep_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], GenEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, owner: str, genkey: str | None, handles: list[GenerationHandle]) -> GenEntry:
        """Register a generation that was just submitted; a reused genkey replaces the older entry."""
        self.prune()
        key = genkey or f"KCPP{secrets.token_hex(6)}"
        entry = GenEntry(owner, key, list(handles), self._clock())
        self._entries.pop((owner, key), None)
        self._entries[(owner, key)] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def finish(self, entry: GenEntry) -> None:
        if entry.finished_at is None:
            entry.finished_at = self._clock()
        entry.done.set()

    def find(self, owner: str, genkey: str | None) -> GenEntry | None:
        """The caller's generation with this genkey, or its most recent one without a genkey."""
        self.prune()
        if genkey:
            return self._entries.get((owner, genkey))
        return self._latest(owner)

    def _latest(self, owner: str, *, running_only: bool = False) -> GenEntry | None:
        for entry in reversed(self._entries.values()):
            if entry.owner == owner and (entry.running or not running_only):
                return entry
        return None

    async def abort(self, owner: str, genkey: str | None, *, wait: float = ABORT_WAIT_SECONDS) -> AbortOutcome:
        """Cancel the caller's generation (by genkey, else its latest running one) and wait briefly for it to end."""
        self.prune()
        if genkey:
            entry = self._entries.get((owner, genkey))
            if entry is None:
                return AbortOutcome.UNKNOWN
        else:
            entry = self._latest(owner, running_only=True)
            if entry is None:
                return AbortOutcome.NOT_RUNNING
        if not entry.running:
            return AbortOutcome.NOT_RUNNING
        entry.aborted = True
        for handle in entry.handles:
            handle.cancel()
        try:
            # The engine frees the slot within a step; the stream then sends its last frame.
            await asyncio.wait_for(entry.done.wait(), wait)
        except TimeoutError:
            pass
        return AbortOutcome.ABORTED

    def prune(self) -> None:
        now = self._clock()
        stale = [
            key for key, e in self._entries.items()
            if e.finished_at is not None and now - e.finished_at > self.keep_seconds
        ]
        for key in stale:
            del self._entries[key]


def get_registry(request: Request) -> GenRegistry:
    """FastAPI dependency: the app's registry, created on first use."""
    registry = getattr(request.app.state, "kobold_genkeys", None)
    if registry is None:
        registry = GenRegistry()
        request.app.state.kobold_genkeys = registry
    return registry


def owner_of(request: Request) -> str:
    """Who is asking: a hash of the presented key when auth is on, else the client's host."""
    auth = getattr(request.app.state, "auth", None)
    if isinstance(auth, AuthManager) and not auth.disabled:
        headers = request.headers
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        key = key or headers.get("x-admin-key", "").strip() or headers.get("x-api-key", "").strip()
        if key:
            return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    host = request.client.host if request.client else "unknown"
    return f"host:{host}"
