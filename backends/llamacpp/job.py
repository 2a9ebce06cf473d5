"""Per-request and per-slot state of the llama.cpp scheduler."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import llama_cpp as lc
import numpy as np

from backends.base import (
    Event,
    Finished,
    GenerationHandle,
    GenerationRequest,
    TokenLogprob,
)
from backends.llamacpp.lora import NO_LORA, LoraKey
from backends.llamacpp.sampler import SamplerChain
from backends.text_stream import TokenTextStream

if TYPE_CHECKING:
    from backends.llamacpp.engine import LlamaCppEngine


class Job(GenerationHandle):
    __slots__ = (
        "bans",
        "cached_tokens",
        "cancelled",
        "draft_len",
        "chain",
        "constraint",
        "context",
        "engine",
        "finished",
        "first_logits",
        "loop",
        "lora_key",
        "max_new",
        "n_accepted",
        "n_cached",
        "n_drafted",
        "n_generated",
        "n_prompt",
        "ngram",
        "params",
        "pending_logprobs",
        "preempted",
        "queue",
        "request",
        "rewinds",
        "slot",
        "stop_ids",
        "stream",
        "t_admit",
        "t_first",
        "t_submit",
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
        self.lora_key: LoraKey = NO_LORA  # set at submission
        self.ngram = NgramIndex()
        self.n_drafted = 0  # speculative tokens guessed for this request
        self.n_accepted = 0  # ... and kept
        self.draft_len = 0  # guesses to ask for next step (0: the engine's maximum)
        self.first_logits: np.ndarray | None = None  # the whole prompt was cached: sample from these

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
    """One KV sequence: the tokens it holds and, for exact reuse, the logits its last prompt gave."""

    __slots__ = ("job", "last_used", "lora_key", "saved", "seq", "tokens")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []  # tokens whose KV this sequence holds, in order
        self.lora_key: LoraKey = NO_LORA  # the adapter set that KV was computed under
        self.job: Job | None = None
        self.last_used = 0.0
        # (position, logits): the raw logits computed at `position` when that position ended a prompt.
        # A later request with the same prompt samples its first token from them instead of
        # recomputing the last prompt token in another batch shape (which rounds differently).
        self.saved: tuple[int, np.ndarray] | None = None

    def cut(self, mem: object, n: int) -> None:
        """Drop KV from position n on; saved logits that depended on dropped KV go too."""
        if n > 0 and lc.llama_memory_seq_rm(mem, self.seq, n, -1):
            del self.tokens[n:]
        else:  # everything, or a memory that cannot drop a tail (recurrent models)
            lc.llama_memory_seq_rm(mem, self.seq, -1, -1)
            self.tokens = []
            n = 0
        if self.saved is not None and self.saved[0] >= n:
            self.saved = None

    def reusable(self, context: list[int]) -> int:
        """How much of `context` this slot's KV can serve: all of it when the saved logits end it,
        else all but the last token (whose logits must be computed)."""
        n = len(context)
        match = common_prefix(self.tokens, context)
        if match >= n and self.saved is not None and self.saved[0] == n - 1:
            return n
        return min(match, n - 1)


class NgramIndex:
    """Where each n-gram of one sequence last occurred, extended as the sequence grows (prompt lookup)."""

    __slots__ = ("table", "upto")

    NGRAM_MIN = 2
    NGRAM_MAX = 4

    def __init__(self) -> None:
        self.table: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.upto = 0  # n-grams ending before this index are in the table

    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's last n-gram."""
        n_ctx = len(context)
        if self.upto > n_ctx - 1:  # the sequence was rewound: start over
            self.table.clear()
            self.upto = 0
        table, lo, hi = self.table, self.NGRAM_MIN, self.NGRAM_MAX
        # Index every n-gram that has a continuation (ends before the last token).
        for end in range(self.upto, n_ctx - 1):
            for n in range(lo, hi + 1):
                start = end - n + 1
                if start < 0:
                    break
                table[tuple(context[start : end + 1])] = end + 1
        self.upto = max(self.upto, n_ctx - 1)
        for n in range(hi, lo - 1, -1):
            if n_ctx >= n:
                follow = table.get(tuple(context[n_ctx - n :]))
                if follow is not None:
                    return context[follow : follow + k]
        return []


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
