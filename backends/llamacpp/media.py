"""Images inside the scheduler: which part of a prompt is text, when an image is ready, and its embedding batch.

A job whose prompt has images (`MediaSpan`s over placeholder ids) is fed in
runs: text through the token batch as usual, each image through an embedding
batch of its own (llama.cpp takes tokens or embeddings in one batch, never
both). An image is encoded on the encoder's thread when the job first reaches
it; until then the job is skipped and every other sequence keeps decoding.
The embeddings land in the job's own KV sequence at the image's positions.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import llama_cpp as lc
import numpy as np

from backends.base import MediaSpan
from backends.llamacpp.job import Job
from backends.llamacpp.mtmd import ImageEncoder


class EmbdBatch:
    """A llama_batch of embeddings (rows of n_embd floats) with numpy buffers."""

    def __init__(self, capacity: int, n_embd: int) -> None:
        self.capacity = capacity
        self.n_embd = n_embd
        self.embd = np.zeros((capacity, n_embd), dtype=np.float32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_flat = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        ptr_t = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_flat.ctypes.data
        self._seq_ptrs = (ptr_t * capacity)(*[ctypes.cast(base + 4 * i, ptr_t) for i in range(capacity)])
        self.struct = lc.llama_batch()
        self.struct.token = None
        self.struct.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.struct.pos = self.pos.ctypes.data_as(ptr_t)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ptr_t)
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ptr_t))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def add(self, rows: np.ndarray, start_pos: int, seq: int, want_last_logits: bool) -> int:
        k = len(rows)
        a, b = self.n, self.n + k
        self.embd[a:b] = rows
        self.pos[a:b] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq_flat[a:b] = seq
        self.logits[a:b] = 0
        if want_last_logits:
            self.logits[b - 1] = 1
        self.n = b
        return b - 1

    def finalize(self) -> lc.llama_batch:
        self.struct.n_tokens = self.n
        return self.struct


def span_at(job: Job, pos: int) -> MediaSpan | None:
    """The image span holding position `pos` of the job's context, if any."""
    for span in job.spans:
        if span.start <= pos < span.end:
            return span
        if span.start > pos:
            return None
    return None


def text_end(job: Job) -> int:
    """Where the run of text that starts at the job's next position ends (an image, or the context's end)."""
    pos = job.n_cached
    for span in job.spans:
        if span.end > pos:
            return pos if span.start <= pos else span.start
    return len(job.context)


def clamp_reuse(job: Job, n: int) -> int:
    """Cached KV may end inside an image only when the image can be fed in parts (causal attention)."""
    for span in job.spans:
        if span.start < n < span.end and span.non_causal:
            return span.start
    return n


class MediaFeeder:
    """The scheduler's helper for image spans; runs on the scheduler thread (encode results come via `post`)."""

    def __init__(
        self,
        encoder: ImageEncoder,
        n_batch: int,
        post: Callable[[Callable[[], None]], bool],
        fail: Callable[[Job, str], None],
    ) -> None:
        self.encoder = encoder
        self.batch = EmbdBatch(n_batch, encoder.n_embd)
        self._post = post  # run a function on the scheduler thread between steps; False once closed
        self._fail = fail  # end a job with an error
        self._requested: dict[str, list[Job]] = {}  # key -> jobs waiting for it

    def blocked(self, job: Job) -> bool:
        """True while the job's next position is an image that is not encoded yet (asking for it once)."""
        if not job.spans or job.n_cached >= len(job.context):
            return False
        span = span_at(job, job.n_cached)
        if span is None or span.key in job.embd:
            return False
        embd = self.encoder.cached(span.key)
        if embd is not None:
            job.embd[span.key] = embd
            return False
        waiting = self._requested.get(span.key)
        if waiting is None:
            self._requested[span.key] = [job]
            media = job.request.media
            self.encoder.request(span.key, media, self._encoded_elsewhere)
        elif job not in waiting:
            waiting.append(job)
        return True

    def _encoded_elsewhere(self, key: str, embd: np.ndarray | None, error: str | None) -> None:
        """On the encoder thread: hand the result to the scheduler thread."""
        self._post(lambda: self._encoded(key, embd, error))

    def _encoded(self, key: str, embd: np.ndarray | None, error: str | None) -> None:
        jobs = self._requested.pop(key, [])
        if embd is None:
            for job in jobs:
                self._fail(job, error or "The image could not be encoded. Send another image or retry.")
            return
        self.encoder.remember(key, embd)
        for job in jobs:
            job.embd[key] = embd

    def fill(self, jobs: list[Job]) -> list[tuple[Job, int, int]]:
        """Put ready image rows of `jobs` into the embedding batch: [(job, rows, batch index of the last row)].

        An image that needs whole-image attention goes alone and whole.
        """
        batch = self.batch
        batch.n = 0
        fed: list[tuple[Job, int, int]] = []
        for job in jobs:
            span = span_at(job, job.n_cached)
            if span is None or span.key not in job.embd:
                continue
            offset = job.n_cached - span.start
            rows = job.embd[span.key][offset:]
            if span.non_causal:
                if fed:
                    continue
                if len(rows) > batch.capacity:
                    self._fail(job, f"This image needs {len(rows)} positions in one batch; load the model with "
                                    f"chunk_size >= {len(rows)}.")
                    continue
            room = batch.capacity - batch.n
            if room <= 0:
                break
            rows = rows[:room]
            last = job.n_cached + len(rows) == len(job.context)
            idx = batch.add(rows, job.n_cached, job.slot.seq, last)
            fed.append((job, len(rows), idx))
            if span.non_causal:
                break
        return fed

    def needs_non_causal(self, fed: list[tuple[Job, int, int]]) -> bool:
        return any((s := span_at(j, j.n_cached)) is not None and s.non_causal for j, _, _ in fed)

    def forget(self, job: Job) -> None:
        """A job ended: stop waiting for its encodes."""
        for waiting in self._requested.values():
            if job in waiting:
                waiting.remove(job)
