"""Per-request and per-slot state of the llama.cpp scheduler."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from backends.base import Event, Finished, GenerationHandle, GenerationRequest, TokenLogprob
from backends.llamacpp.sampler import SamplerChain
from common.stopping import TokenTextStream

if TYPE_CHECKING:
    from backends.llamacpp.engine import LlamaCppEngine


class Job(GenerationHandle):
    __slots__ = ("engine",
        "request", "loop", "queue", "cancelled", "finished", "context", "n_prompt",
        "n_cached", "n_generated", "max_new", "stream", "chain", "slot",
        "cached_tokens", "t_submit", "t_admit", "t_first", "stop_ids", "params",
        "constraint", "bans", "rewinds", "pending_logprobs", "preempted",
    )

    def __init__(
        self, engine: LlamaCppEngine, request: GenerationRequest, loop: asyncio.AbstractEventLoop, n_ctx: int
    ) -> None:
        self.engine = engine
        self.request = request
        self.params = request.params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.context = list(request.prompt_tokens)
        self.n_prompt = len(self.context)
        self.n_cached = 0
        self.n_generated = 0
        limit = n_ctx - self.n_prompt
        self.max_new = min(self.params.max_tokens or limit, limit)
        self.stream = TokenTextStream(self.params.stop, self.params.banned_strings)
        self.chain: SamplerChain | None = None
        self.slot: Slot | None = None
        self.cached_tokens = 0
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.constraint = request.constraint.new_state() if request.constraint is not None else None
        self.bans: dict[int, set[int]] = {}  # generated position -> tokens banned there (banned strings)
        self.rewinds = 0
        self.preempted = False  # recomputed after the KV cache ran full; readmitted only with room to finish
        self.pending_logprobs: deque[TokenLogprob] = deque()

    @property
    def remaining(self) -> int:
        return max(0, self.max_new - self.n_generated)

    def needs_logits(self) -> bool:
        return (
            self.constraint is not None
            or self.params.logprobs is not None
            or self.n_generated < self.params.min_tokens
            or self.n_generated in self.bans
        )

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        self.engine._cancel(self)


class Slot:
    __slots__ = ("seq", "tokens", "job", "last_used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []  # tokens whose KV this sequence holds, in order
        self.job: Job | None = None
        self.last_used = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share long prefixes, Python loops are slow.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i
