"""Continuous-batching scheduler over one llama.cpp context.

One thread owns the context. Each step it
1. drops cancelled jobs and admits waiting ones into free sequence slots,
   reusing the longest cached prefix (the slot's own, or another slot's via
   llama_memory_seq_cp, which shares KV cells in the unified cache);
2. builds one batch: one token for every decoding sequence, then prefill
   chunks for new ones up to n_batch, so a long prompt delays running streams
   by at most one chunk;
3. runs one llama_decode;
4. samples every sequence that produced logits with its own native chain;
5. assembles text (UTF-8 and stop strings), and hands each job's events to its
   event loop in one call per loop per step.

Prefill and decode are one mechanism: a job's `context` holds every token it
needs in the KV cache (prompt, then sampled tokens); `n_cached` counts those
already decoded. Whatever lies between is fed next.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import llama_cpp as lc
import numpy as np
from loguru import logger

from backends.base import (
    Engine,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    LoadOptions,
    TextDelta,
    TokenLogprob,
    Usage,
)
from backends.llamacpp.native import NativeBatch, NativeModel
from backends.llamacpp.sampler import UNSUPPORTED, build_chain
from common.errors import ModelNotLoadedError, ServiceUnavailableError
from backends.llamacpp.job import Job, Slot, common_prefix
from common.logprobs import log_softmax, token_logprob
from common.stopping import Release, Rewind, StopHit

# Rewinds for banned strings one request may make before it is ended.
_MAX_REWINDS = 64

# A waiting job holds back for a prefilling job whose prompt it shares when
# that saves at least this many tokens of prefill.
_SHARE_MIN_TOKENS = 32


class LlamaCppEngine(Engine):
    def __init__(self, native: NativeModel, name: str, options: LoadOptions) -> None:
        self.native = native
        self.info = native.model_info(name)
        self._options = options
        self._max_queue = options.max_queue
        self._slots = [Slot(i) for i in range(native.n_slots)]
        self._batch = NativeBatch(native.n_batch)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._commands: deque[Callable[[], None]] = deque()  # run on the scheduler thread
        self._wake = False
        self._stopping = False
        self._closed = False
        self._finished_count = 0
        self._generated_count = 0
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls,
        path: Path,
        name: str,
        options: LoadOptions,
        progress: Callable[[float], None] | None = None,
    ) -> LlamaCppEngine:
        """Blocking: call from a worker thread."""
        return cls(NativeModel(path, options, progress), name, options)

    # -- Engine interface -------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.native.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.native.detokenize(tokens, special=special)

    def token_piece(self, token: int) -> bytes:
        return self.native.piece(token, special=True)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        return self._submit(request)

    def stats(self) -> EngineStats:
        active = [s for s in self._slots if s.job is not None]
        return EngineStats(
            slots_total=len(self._slots),
            slots_active=len(active),
            queue_depth=len(self._waiting),
            kv_cells_total=self.native.n_ctx,
            kv_cells_used=sum(len(s.tokens) for s in active),
            cached_prefix_tokens=sum(len(s.tokens) for s in self._slots if s.job is None),
            requests_finished=self._finished_count,
            tokens_generated=self._generated_count,
        )

    async def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self.native.free()

    async def clear_cache(self) -> None:
        """Forget every cached prefix of idle slots (running requests keep theirs)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def command() -> None:
            for slot in self._slots:
                if slot.job is None and slot.tokens:
                    lc.llama_memory_seq_rm(self.native.mem, slot.seq, -1, -1)
                    slot.tokens = []
            loop.call_soon_threadsafe(done.set_result, None)

        with self._cv:
            self._commands.append(command)
            self._wake = True
            self._cv.notify()
        await done

    def check_consistency(self) -> None:
        """Assert each slot's bookkeeping matches the KV cache (call while idle; for tests)."""
        for slot in self._slots:
            top = lc.llama_memory_seq_pos_max(self.native.mem, slot.seq)
            assert top == len(slot.tokens) - 1, f"slot {slot.seq}: KV ends at {top}, bookkeeping has {len(slot.tokens)}"

    # -- submission (event loop side) ---------------------------------------
    def _submit(self, request: GenerationRequest) -> Job:
        unsupported = UNSUPPORTED & request.params.active_knobs()
        if unsupported:
            logger.warning(
                "llama.cpp has no sampler for {}; accepted but not applied (request {})",
                ", ".join(sorted(unsupported)), request.request_id,
            )
        job = Job(self, request, asyncio.get_running_loop(), self.info.n_ctx)
        with self._cv:
            if self._closed:
                raise ModelNotLoadedError(
                    f"Model '{self.info.name}' is unloading. Load a model and retry."
                )
            running = sum(1 for s in self._slots if s.job is not None)
            if len(self._waiting) + running >= len(self._slots) + self._max_queue:
                raise ServiceUnavailableError(
                    f"The server is busy: {len(self._waiting)} requests are waiting for a slot. Retry shortly.",
                    retry_after=1,
                    code="server_busy",
                )
            self._waiting.append(job)
            self._wake = True
            self._cv.notify()
        return job

    def _cancel(self, job: Job) -> None:
        with self._cv:
            job.cancelled = True
            self._wake = True
            self._cv.notify()

    # -- scheduler thread ---------------------------------------------------
    def _run(self) -> None:
        outbox: dict[Job, list[Event]] = {}
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._wake or self._waiting or self._has_active()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._wake = False
                    while self._commands:
                        self._commands.popleft()()
                    self._reap_cancelled(outbox)
                    self._admit(outbox)
                if self._has_active():
                    self._step(outbox)
                self._deliver(outbox)
        except Exception as exc:  # noqa: BLE001 - the engine must report, not vanish
            logger.exception("llama.cpp scheduler failed")
            self._fail_all(outbox, FinishReason.ERROR, f"The engine failed: {exc}. Reload the model.")
            with self._cv:
                self._closed = True
        else:
            self._fail_all(outbox, FinishReason.UNLOAD, "The model was unloaded.")
        self._deliver(outbox)

    def _has_active(self) -> bool:
        return any(s.job is not None for s in self._slots)

    def _fail_all(self, outbox: dict[Job, list[Event]], reason: FinishReason, message: str) -> None:
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting + [s.job for s in self._slots if s.job is not None]:
            self._finish(job, reason, outbox, error=message)

    def _reap_cancelled(self, outbox: dict[Job, list[Event]]) -> None:
        if any(j.cancelled for j in self._waiting):
            keep = deque()
            for job in self._waiting:
                if job.cancelled:
                    self._finish(job, FinishReason.CANCELLED, outbox)
                else:
                    keep.append(job)
            self._waiting = keep
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot.job, FinishReason.CANCELLED, outbox)

    def _kv_used(self) -> int:
        # Upper bound: cells shared between sequences are counted once per sequence.
        return sum(len(s.tokens) for s in self._slots)

    def _admit(self, outbox: dict[Job, list[Event]]) -> None:
        deferred: list[Job] = []
        while self._waiting:
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            job = self._waiting.popleft()
            if self._should_wait_for_sharer(job):
                deferred.append(job)
                continue
            slot, own, source, shared = self._choose_slot(job.context, free)
            need = len(job.context) - max(own, shared)
            if job.preempted and self._has_active():
                # It ran the cache full once: come back only when everyone can finish.
                need += job.remaining + sum(s.job.remaining for s in self._slots if s.job is not None)
            if not self._make_room(need, slot):
                self._waiting.appendleft(job)
                break
            self._place(job, slot, own, source, shared)
        self._waiting.extendleft(reversed(deferred))

    def _should_wait_for_sharer(self, job: Job) -> bool:
        """True when a job still prefilling shares a long prefix with this one: wait, then copy its KV."""
        cached = max((common_prefix(s.tokens, job.context) for s in self._slots), default=0)
        for s in self._slots:
            other = s.job
            if other is None or other.n_cached >= other.n_prompt:
                continue
            shared = common_prefix(other.context[: other.n_prompt], job.context)
            if shared - cached >= _SHARE_MIN_TOKENS:
                return True
        return False

    def _choose_slot(self, context: list[int], free: list[Slot]) -> tuple[Slot, int, Slot | None, int]:
        """Pick a free slot and the best KV to reuse: (slot, own prefix, source slot, shared prefix)."""
        limit = len(context) - 1  # at least one token must be decoded for logits
        best_free, best_own = None, -1
        for s in free:
            own = min(common_prefix(s.tokens, context), limit)
            better = own > best_own or (own == best_own and best_free is not None and s.last_used < best_free.last_used)
            if better:
                best_free, best_own = s, own
        assert best_free is not None
        source, shared = None, best_own
        for s in self._slots:
            if s is best_free:
                continue
            n = min(common_prefix(s.tokens, context), limit)
            if n > shared:
                source, shared = s, n
        return best_free, best_own, source, shared

    def _make_room(self, need: int, target: Slot) -> bool:
        """Evict idle cached prefixes (least recently used first) until `need` cells fit."""
        capacity = self.native.n_ctx
        if self._kv_used() + need <= capacity:
            return True
        idle = sorted(
            (s for s in self._slots if s.job is None and s.tokens and s is not target),
            key=lambda s: s.last_used,
        )
        for s in idle:
            lc.llama_memory_seq_rm(self.native.mem, s.seq, -1, -1)
            s.tokens = []
            if self._kv_used() + need <= capacity:
                return True
        return self._kv_used() + need <= capacity or not self._has_active()

    def _place(self, job: Job, slot: Slot, own: int, source: Slot | None, shared: int) -> None:
        mem = self.native.mem
        if source is not None and shared > own:
            lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            lc.llama_memory_seq_cp(mem, source.seq, slot.seq, 0, shared)
            reuse = shared
        else:
            if not lc.llama_memory_seq_rm(mem, slot.seq, own, -1):
                lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
                own = 0
            reuse = own
        slot.tokens = job.context[:reuse]
        slot.job = job
        job.slot = slot
        job.n_cached = reuse
        job.cached_tokens = reuse
        job.t_admit = time.perf_counter()
        n = self.native
        job.chain = build_chain(
            job.params, vocab=n.vocab, n_vocab=n.n_vocab, n_ctx=n.n_ctx, eog_tokens=n.eog_tokens
        )

    def _step(self, outbox: dict[Job, list[Event]]) -> None:
        # A full KV cache makes llama_decode refuse the batch (and leave the cache as it was);
        # freeing room then retrying keeps every step productive.
        while True:
            fed, sample_at = self._fill_batch()
            if not fed:
                return
            rc = lc.llama_decode(self.native.ctx, self._batch.finalize())
            if rc == 0:
                break
            if not self._on_decode_failure(rc, fed, outbox):
                return
        for job, take in fed:
            job.slot.tokens.extend(job.context[job.n_cached : job.n_cached + take])
            job.n_cached += take
        for job, idx in sample_at:
            self._sample(job, idx, outbox)

    def _fill_batch(self) -> tuple[list[tuple[Job, int]], list[tuple[Job, int]]]:
        batch = self._batch
        batch.clear()
        budget = batch.capacity
        sample_at: list[tuple[Job, int]] = []
        fed: list[tuple[Job, int]] = []
        active = [s.job for s in self._slots if s.job is not None]
        # Decoding sequences first (one token each), then prefill in admission order.
        active.sort(key=lambda j: (len(j.context) - j.n_cached > 1, j.t_admit))
        for job in active:
            pending = len(job.context) - job.n_cached
            if pending <= 0 or budget <= 0:
                continue
            take = min(pending, budget)
            last = job.n_cached + take == len(job.context)
            idx = batch.add(job.context[job.n_cached : job.n_cached + take], job.n_cached, job.slot.seq, last)
            budget -= take
            fed.append((job, take))
            if last:
                sample_at.append((job, idx))
        return fed, sample_at

    def _on_decode_failure(self, rc: int, fed: list[tuple[Job, int]], outbox: dict[Job, list[Event]]) -> bool:
        """Make room after a refused batch; True when the step should be retried."""
        if rc == 1:
            idle = [s for s in self._slots if s.job is None and s.tokens]
            if idle:  # cached prefixes go first
                for s in idle:
                    lc.llama_memory_seq_rm(self.native.mem, s.seq, -1, -1)
                    s.tokens = []
                return True
            victim = max((j for j, _ in fed), key=lambda j: j.t_admit)
            if len(fed) > 1:
                self._preempt(victim)
                return True
            # One sequence alone does not fit: the cache is smaller than its context.
            self._finish(victim, FinishReason.LENGTH, outbox)
            return False
        for job, _ in fed:
            self._finish(job, FinishReason.ERROR, outbox, error=f"llama_decode failed with code {rc}.")
        return False

    def _preempt(self, job: Job) -> None:
        slot = job.slot
        assert slot is not None
        lc.llama_memory_seq_rm(self.native.mem, slot.seq, -1, -1)
        slot.tokens = []
        slot.job = None
        job.slot = None
        job.n_cached = 0
        job.preempted = True
        with self._cv:
            self._waiting.appendleft(job)
        logger.debug("KV cache full: preempted {} to recompute later", job.request.request_id)

    def _sample(self, job: Job, idx: int, outbox: dict[Job, list[Event]]) -> None:
        assert job.chain is not None
        params = job.params
        logprobs = None
        if job.needs_logits():
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.native.ctx, idx), shape=(self.native.n_vocab,))
            if params.logprobs is not None:
                logprobs = log_softmax(logits)  # the model's own distribution, before any mask
            if job.constraint is not None:
                if job.constraint.is_finished():
                    self._finish(job, FinishReason.STOP, outbox)
                    return
                job.constraint.apply_to_logits(logits)
            if job.n_generated < params.min_tokens:
                logits[list(self.native.eog_tokens)] = -np.inf
            banned = job.bans.get(job.n_generated)
            if banned:
                logits[list(banned)] = -np.inf
        token = lc.llama_sampler_sample(job.chain.ptr, self.native.ctx, idx)
        if job.n_generated == 0:
            job.t_first = time.perf_counter()
        job.n_generated += 1
        self._generated_count += 1
        if (lc.llama_vocab_is_eog(self.native.vocab, token) and not params.ignore_eos) or token in job.stop_ids:
            self._finish(job, FinishReason.STOP, outbox)
            return
        if job.constraint is not None:
            job.constraint.advance(token)
        job.context.append(token)
        if logprobs is not None:
            job.pending_logprobs.append(token_logprob(logprobs, token, params.logprobs or 0, self._piece))
        got = job.stream.push(token, self.native.piece(token, special=not params.skip_special_tokens))
        if isinstance(got, Rewind):
            self._rewind(job, got, outbox)
            return
        if isinstance(got, StopHit):
            self._emit(job, got.release, outbox)
            self._finish(job, FinishReason.STOP, outbox, stop_string=got.stop)
            return
        self._emit(job, got, outbox)
        if job.n_generated >= job.max_new:
            self._finish(job, FinishReason.LENGTH, outbox)

    def _piece(self, token: int) -> bytes:
        return self.native.piece(token, special=True)

    def _emit(self, job: Job, release: Release, outbox: dict[Job, list[Event]]) -> None:
        if not release.tokens and not release.text:
            return
        lps: tuple[TokenLogprob, ...] = ()
        if job.pending_logprobs:
            lps = tuple(job.pending_logprobs.popleft() for _ in release.tokens if job.pending_logprobs)
        outbox.setdefault(job, []).append(TextDelta(release.text, release.tokens, lps))

    def _rewind(self, job: Job, rewind: Rewind, outbox: dict[Job, list[Event]]) -> None:
        """A banned string appeared: drop its tokens and sample that position again without them."""
        n = rewind.n_tokens
        job.rewinds += 1
        del job.context[-n:]
        job.n_generated -= n
        job.bans.setdefault(job.n_generated, set()).add(rewind.banned_token)
        for _ in range(min(n, len(job.pending_logprobs))):
            job.pending_logprobs.pop()
        if job.constraint is not None:
            job.constraint.rollback(n)
        # Re-decode the last kept token so its logits are there to sample from again.
        keep = len(job.context) - 1
        assert job.slot is not None and job.chain is not None
        lc.llama_memory_seq_rm(self.native.mem, job.slot.seq, keep, -1)
        del job.slot.tokens[keep:]
        job.n_cached = keep
        lc.llama_sampler_reset(job.chain.ptr)
        for t in job.context[job.n_prompt :]:
            job.chain.accept(t)
        if job.rewinds > _MAX_REWINDS:
            logger.warning("{}: banned strings forced {} rewinds; ending the output", job.request.request_id, _MAX_REWINDS)
            self._finish(job, FinishReason.STOP, outbox)

    def _finish(
        self,
        job: Job,
        reason: FinishReason,
        outbox: dict[Job, list[Event]],
        *,
        stop_string: str | None = None,
        error: str | None = None,
    ) -> None:
        if job.finished:
            return
        job.finished = True
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._emit(job, job.stream.flush(), outbox)
        slot = job.slot
        if slot is not None:
            slot.job = None
            slot.last_used = time.perf_counter()
            # slot.tokens keeps what is in KV: a later request may reuse it.
            job.slot = None
        if job.chain is not None:
            job.chain.free()
            job.chain = None
        end = time.perf_counter()
        admitted = job.t_admit or end
        first = job.t_first or end
        usage = Usage(
            prompt_tokens=job.n_prompt,
            completion_tokens=job.n_generated,
            cached_tokens=job.cached_tokens,
            queue_seconds=admitted - job.t_submit,
            prompt_seconds=max(0.0, first - admitted),
            generation_seconds=max(0.0, end - first),
        )
        self._finished_count += 1
        outbox.setdefault(job, []).append(Finished(reason, usage, stop_string=stop_string, error=error))

    def _deliver(self, outbox: dict[Job, list[Event]]) -> None:
        if not outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[Event]]]] = {}
        for job, events in outbox.items():
            by_loop.setdefault(job.loop, []).append((job, events))
        outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[Job, list[Event]]]) -> None:
    for job, events in items:
        for event in events:
            job.queue.put_nowait(event)
