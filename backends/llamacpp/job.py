"""The scheduler thread's state: each request's sequence (`Job`), each KV slot (`Slot`), and their `SlotState`.

Only the scheduler thread reads or writes these after a job is submitted; the
event-loop side of a request is its `RequestHandle` (engine_thread.py).
"""

from __future__ import annotations

import ctypes
import enum
import time
from collections import deque
from collections.abc import Callable

import llama_cpp as lc
import numpy as np

from backends.base import ConstraintState, GenerationRequest, TokenLogprob
from backends.engine_thread import RequestHandle
from backends.llamacpp.lora import NO_LORA, LoraKey
from backends.llamacpp.sampler import SamplerChain
from backends.llamacpp.speculative import NgramIndex, common_prefix
from backends.text_stream import TokenTextStream


class SlotState(enum.Enum):
    """Where a request stands, which is what its slot is doing; a slot with no request is IDLE.

    QUEUED -> [WAITING_FOR_SHARER ->] PREFILLING -> GENERATING -> DONE; a preempted
    request goes back to QUEUED, and a request whose prompt is already in KV
    goes straight to GENERATING.
    """

    IDLE = "idle"  # a slot without a request: its KV is a cached prefix later requests may reuse
    QUEUED = "queued"  # waiting for a free slot
    WAITING_FOR_SHARER = "waiting_for_sharer"  # held back while a prefilling request computes a prefix it shares
    PREFILLING = "prefilling"  # in a slot, its prompt partly in KV
    GENERATING = "generating"  # in a slot, prompt in KV: sampling a token per step
    DONE = "done"  # finished; it left its slot


class Job:
    """One request's sequence: its tokens, counters, sampler chain, text stream and constraint state."""

    __slots__ = (
        "bans",
        "cached_tokens",
        "chain",
        "constraint",
        "context",
        "draft_len",
        "embd",
        "first_logits",
        "handle",
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
        "request",
        "rewinds",
        "slot",
        "spans",
        "state",
        "stop_ids",
        "stream",
        "t_admit",
        "t_first",
        "t_submit",
    )

    def __init__(self, handle: RequestHandle, n_ctx: int, lora_key: LoraKey = NO_LORA) -> None:
        request: GenerationRequest = handle.request
        self.handle = handle  # where events go (on its event loop)
        self.request = request
        self.params = request.params
        self.lora_key = lora_key
        self.state = SlotState.QUEUED
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
        self.constraint: ConstraintState | None = (
            request.constraint.new_state() if request.constraint is not None else None
        )
        self.bans: dict[int, set[int]] = {}  # generated position -> tokens banned there (banned strings)
        self.rewinds = 0
        self.preempted = False  # recomputed after the KV cache ran full; readmitted only with room to finish
        self.pending_logprobs: deque[TokenLogprob] = deque()
        self.ngram = NgramIndex()
        self.n_drafted = 0  # speculative tokens guessed for this request
        self.n_accepted = 0  # ... and kept
        self.draft_len = 0  # guesses to ask for next step (0: the engine's maximum)
        self.first_logits: np.ndarray | None = None  # the whole prompt was cached: sample from these
        self.spans = request.media.spans if request.media is not None else ()  # image positions in the prompt
        self.embd: dict[str, np.ndarray] = {}  # encoded images this job holds until they are in its KV

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


class ParkedKV:
    """One sequence's KV in host memory: the first `size` bytes of `buffer` (parking.py makes these).

    `release` hands the buffer back to whoever lent it, so that the next park reuses memory already
    mapped instead of faulting in fresh pages.
    """

    __slots__ = ("buffer", "size", "_give_back")

    def __init__(self, buffer: ctypes.Array[ctypes.c_uint8], size: int,
                 give_back: Callable[[ctypes.Array[ctypes.c_uint8]], None]) -> None:
        self.buffer = buffer
        self.size = size
        self._give_back = give_back

    def release(self) -> None:
        self._give_back(self.buffer)


class Slot:
    """One KV sequence: the tokens it holds and, for exact reuse, the logits its last prompt gave."""

    __slots__ = ("job", "last_used", "lora_key", "parked", "saved", "seq", "tokens")

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
        # The sequence's KV copied to host memory while the slot idles (parking.py);
        # `tokens` still says what it holds, and no cell of the cache does.
        self.parked: ParkedKV | None = None

    @property
    def state(self) -> SlotState:
        job = self.job
        return SlotState.IDLE if job is None else job.state

    def cut(self, mem: object, n: int) -> None:
        """Drop KV from position n on; saved logits that depended on dropped KV go too.

        A parked prefix is restored before any request uses it, so cutting one drops it whole.
        """
        if self.parked is not None:
            self.parked.release()
            self.parked = None
            n = 0
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
