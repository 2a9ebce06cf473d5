"""One request inside the transformers engine: its counters, text stream, sampler and constraint state.

Created on the event loop by `submit`; from then on only the generation thread
(batching.py) reads or writes it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from backends.base import ConstraintState, TokenLogprob
from backends.engine_thread import RequestHandle
from backends.text_stream import TokenTextStream
from backends.transformers.sampler import RowSampler

_SERIAL = itertools.count()  # distinct library ids for requests that share a request_id (n > 1)


class TfJob:
    __slots__ = (
        "blocks", "constraint", "done", "handle", "history", "max_new", "n_generated", "n_prompt", "params",
        "pending_logprobs", "request", "rid", "sampler", "stop_ids", "stream", "t_admit", "t_first", "t_submit",
    )

    def __init__(self, handle: RequestHandle, n_ctx: int) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.params = request.params
        self.rid = f"{request.request_id}#{next(_SERIAL)}"
        self.history = list(request.prompt_tokens)  # prompt, then each sampled token
        self.n_prompt = len(self.history)
        limit = max(0, n_ctx - self.n_prompt)
        self.max_new = min(self.params.max_tokens or limit, limit)
        self.n_generated = 0
        self.stream = TokenTextStream(self.params.stop, ())
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.constraint: ConstraintState | None = (
            request.constraint.new_state() if request.constraint is not None else None
        )
        self.sampler: RowSampler | None = None  # built at admission, on the generation thread
        self.pending_logprobs: deque[TokenLogprob] = deque()
        self.blocks = 0  # cache blocks reserved while admitted
        self.done = False
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
