"""The scheduler of the llama.cpp engine: admission, batching, sampling, speculation.

A `Scheduler` runs on the process's llama.cpp compute thread (compute.py),
taking turns with the other models' schedulers there; that thread owns the
llama.cpp context and every `Job` and `Slot`. Event loops reach it only through
its `Inbox` (engine_thread.py), whose posts wake the thread; it hands events
back with `loop.call_soon_threadsafe`. Each pass: take messages, admit waiting
jobs, run one step, deliver the events.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import llama_cpp as lc
import numpy as np
from loguru import logger

from backends.base import EngineStats, Event, Finished, FinishReason
from backends.engine_thread import (
    Cancel, Command, Inbox, InboxClosed, Message, RequestHandle, Submit, deliver_all, timed_usage,
)
from backends.llamacpp.admission import choose_slot, should_wait_for_sharer
from backends.llamacpp.fastdraw import DrawKernel
from backends.llamacpp.job import Job, Slot, SlotState
from backends.llamacpp.lora import NO_LORA, AdapterStore, LoraKey
from backends.llamacpp.media import MediaFeeder, text_end
from backends.llamacpp.mtmd import ImageEncoder
from backends.llamacpp.native import NativeBatch, NativeModel
from backends.llamacpp.parking import Parking
from backends.llamacpp.sampler import build_chain
from backends.llamacpp.speculation import Speculation
from backends.llamacpp.speculative import Drafter
from backends.logprobs import log_softmax, token_logprob
from backends.sampling import sampling_failure
from backends.text_stream import Release, Rewind, StopHit, text_delta

# Rewinds for banned strings one request may make before it is ended.
_MAX_REWINDS = 64


class Scheduler:
    """Everything here runs on the scheduler thread, except `stats` (a snapshot read from any thread)."""

    def __init__(
        self,
        native: NativeModel,
        inbox: Inbox,
        adapters: AdapterStore,
        drafter: Drafter | None,
        draft_max: int,
        encoder: ImageEncoder | None = None,
        draft_adaptive: bool = True,
        draw_kernel: DrawKernel | None = None,
    ) -> None:
        self.native = native
        self._draw_kernel = draw_kernel  # the compiled draw for plain-temperature chains (None: numpy)
        self._media = (  # images: None when the model has no projector
            MediaFeeder(encoder, native.n_batch, self._run_between_steps, self._fail_image) if encoder else None
        )
        self.slots = [Slot(i) for i in range(native.n_slots)]
        self._parking = Parking(native.ctx, native.mem, self.slots, max_tokens=native.n_ctx)
        self._inbox = inbox
        self._adapters = adapters
        self._spec = Speculation(drafter, draft_max, native.mem, draft_adaptive) if drafter is not None else None
        self._batch = NativeBatch(native.n_batch)
        self._eog = frozenset(native.eog_tokens)  # the same set llama_vocab_is_eog answers, without a call per token
        self._unread: deque[Message] = deque()  # taken from the inbox, not yet handled
        self._waiting: deque[Job] = deque()  # submitted, not in a slot, in admission order
        self._outbox: dict[Job, list[Event]] = {}  # events of this pass, delivered at its end
        self._lora_turn = 0
        self.finished_count = 0
        self.generated_count = 0
        self.ended = threading.Event()  # set once the inbox closed (or a step failed) and every request ended

    # -- the compute thread's turns (compute.EngineLoop) ------------------------------
    def ready(self) -> bool:
        return self._inbox.pending() or self._has_work()

    def run_pass(self) -> bool:
        """Messages, admission, one step, delivery; False once the engine has ended."""
        try:
            messages = self._inbox.take(wait=False)
            if messages is None:
                self._shut_down(FinishReason.UNLOAD, "The model was unloaded.")
                return False
            unread = self._unread
            unread.extend(messages)
            while unread:
                self._on_message(unread.popleft())
            self._admit()
            if self._has_active():
                self._step()
            self._deliver()
            return True
        except Exception as exc:  # noqa: BLE001 - the engine must report, not vanish
            logger.exception("llama.cpp scheduler failed")
            self._inbox.close(failure=f"{type(exc).__name__}: {exc}")
            self._shut_down(FinishReason.ERROR, f"The engine failed: {exc}. Reload the model.")
            return False

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Submit):
            job = message.job
            missing = [n for n, _ in job.lora_key if n not in self._adapters.adapters]
            if missing:  # unloaded between its submission and now
                self._finish(job, FinishReason.UNLOAD, error="A LoRA adapter this request used was unloaded.")
            else:
                self._waiting.append(job)
        elif isinstance(message, Cancel):
            self._cancel(message.handle)
        else:
            message.run()

    def _cancel(self, handle: RequestHandle) -> None:
        """Finish the request of `handle` as cancelled, wherever it is (nothing when already done)."""
        for slot in self.slots:
            if slot.job is not None and slot.job.handle is handle:
                self._finish(slot.job, FinishReason.CANCELLED)
                return
        for job in self._waiting:
            if job.handle is handle:
                self._waiting.remove(job)
                self._finish(job, FinishReason.CANCELLED)
                return

    def _shut_down(self, reason: FinishReason, message: str) -> None:
        self._unread.extend(self._inbox.drain())
        for left in self._unread:
            if isinstance(left, Submit):
                self._waiting.append(left.job)
            elif isinstance(left, Command):
                left.abandon()
        self._unread.clear()
        for job in list(self._waiting) + [s.job for s in self.slots if s.job is not None]:
            self._finish(job, reason, error=message)
        self._waiting.clear()
        self._deliver()
        self.ended.set()

    # -- commands (the engine runs these on this thread through the inbox) ----
    def unload_loras(self, gone: set[str]) -> list[str]:
        """End the requests that use an adapter in `gone`, drop KV made under one, free them."""
        users = list(self._waiting) + [s.job for s in self.slots if s.job is not None]
        for job in users:
            if any(n in gone for n, _ in job.lora_key):
                self._finish(job, FinishReason.UNLOAD, error="A LoRA adapter this request used was unloaded.")
        self._waiting = deque(j for j in self._waiting if j.state is not SlotState.DONE)
        for slot in self.slots:
            if slot.state is SlotState.IDLE and any(n in gone for n, _ in slot.lora_key):
                slot.cut(self.native.mem, 0)
                slot.lora_key = NO_LORA
        freed = [n for n in gone if n in self._adapters.adapters]
        for n in freed:
            self._adapters.free(n)
        self._deliver()
        return sorted(freed)

    def clear_cache(self) -> None:
        """Forget every cached prefix of idle slots (running requests keep theirs)."""
        for slot in self.slots:
            if slot.state is SlotState.IDLE and slot.tokens:
                slot.cut(self.native.mem, 0)

    def check_consistency(self) -> None:
        """Assert each slot's bookkeeping matches the KV cache (while idle; for tests)."""
        for slot in self.slots:
            top = lc.llama_memory_seq_pos_max(self.native.mem, slot.seq)
            if slot.parked is not None:
                assert top == -1, f"slot {slot.seq} is parked but still holds KV up to {top}"
                continue
            assert top == len(slot.tokens) - 1, f"slot {slot.seq}: KV ends at {top}, bookkeeping has {len(slot.tokens)}"

    def stats(self) -> EngineStats:
        """A snapshot from any thread: each figure is current, together they may be a step apart."""
        states = [(s.state, len(s.tokens)) for s in self.slots]
        active = [n for state, n in states if state is not SlotState.IDLE]
        return EngineStats(
            slots_total=len(states),
            slots_active=len(active),
            queue_depth=max(0, self._inbox.outstanding - len(active)),
            kv_cells_total=self.native.n_ctx,
            kv_cells_used=sum(active),
            cached_prefix_tokens=sum(n for state, n in states if state is SlotState.IDLE),
            requests_finished=self.finished_count,
            tokens_generated=self.generated_count,
            draft_tokens=self._spec.drafted_count if self._spec else 0,
            accepted_draft_tokens=self._spec.accepted_count if self._spec else 0,
            failure=self._inbox.failure,
        )

    # -- admission -------------------------------------------------------------
    def _has_active(self) -> bool:
        return any(s.state is not SlotState.IDLE for s in self.slots)

    def _has_work(self) -> bool:
        """Something to admit or to compute now (a job waiting only for its image encode is not)."""
        if self._media is None:
            return bool(self._waiting) or self._has_active()
        if self._waiting and any(s.state is SlotState.IDLE for s in self.slots):
            return True
        return any(s.job is not None and not self._media.blocked(s.job) for s in self.slots)

    def _kv_used(self) -> int:
        # Upper bound: cells shared between sequences are counted once per sequence; parked ones hold none.
        return sum(len(s.tokens) for s in self.slots if s.parked is None)

    def _admit(self) -> None:
        deferred: list[Job] = []
        while self._waiting:
            free = [s for s in self.slots if s.state is SlotState.IDLE]
            if not free:
                break
            job = self._waiting.popleft()
            try:
                placed = self._admit_one(job, free, deferred)
            except BaseException:  # back in the queue unless placed, so that the shutdown that follows ends it
                if job.slot is None and job not in deferred:
                    self._waiting.appendleft(job)
                raise
            if not placed:
                break
        self._waiting.extendleft(reversed(deferred))

    def _admit_one(self, job: Job, free: list[Slot], deferred: list[Job]) -> bool:
        """Place `job` in one of the `free` slots, or defer it; False (job back in front) when the cache is full."""
        if should_wait_for_sharer(job, self.slots):
            job.state = SlotState.WAITING_FOR_SHARER
            deferred.append(job)
            return True
        job.state = SlotState.QUEUED
        slot, own, source, shared = choose_slot(job, free, self.slots)
        # A copied prefix is in the cache already (sources are never parked); a parked own prefix comes back in.
        if source is not None and shared > own:
            need = len(job.context) - shared
        else:
            need = len(job.context) - (own if slot.parked is None else 0)
        if job.preempted and self._has_active():
            # It ran the cache full once: come back only when everyone can finish.
            need += job.remaining + sum(s.job.remaining for s in self.slots if s.job is not None)
        if not self._make_room(need, slot):
            self._waiting.appendleft(job)
            return False
        self._place(job, slot, own, source, shared)
        return True

    def _make_room(self, need: int, target: Slot) -> bool:
        """Evict idle cached prefixes (least recently used first) until `need` cells fit."""
        capacity = self.native.n_ctx
        if self._kv_used() + need <= capacity:
            return True
        idle = sorted(
            (s for s in self.slots if s.state is SlotState.IDLE and s.tokens and s.parked is None and s is not target),
            key=lambda s: s.last_used,
        )
        for s in idle:
            s.cut(self.native.mem, 0)
            if self._kv_used() + need <= capacity:
                return True
        return self._kv_used() + need <= capacity or not self._has_active()

    def _place(self, job: Job, slot: Slot, own: int, source: Slot | None, shared: int) -> None:
        mem = self.native.mem
        parking = self._parking
        if source is not None and shared > own:
            slot.cut(mem, 0)
            lc.llama_memory_seq_cp(mem, source.seq, slot.seq, 0, shared)
            reuse = shared
            slot.tokens = job.context[:reuse]
            slot.saved = source.saved if source.saved is not None and source.saved[0] < reuse else None
        else:
            if slot.parked is not None and not (own and parking.restore(slot)):
                own = 0
            slot.cut(mem, own)
            reuse = len(slot.tokens)
        parking.park_idle(keep=slot)
        if reuse == len(job.context) and slot.saved is not None:
            job.first_logits = slot.saved[1]
        slot.lora_key = job.lora_key
        slot.job = job
        job.slot = slot
        job.state = SlotState.PREFILLING if reuse < job.n_prompt else SlotState.GENERATING
        job.n_cached = reuse
        job.cached_tokens = reuse
        job.t_admit = time.perf_counter()
        n = self.native
        job.chain = build_chain(
            job.params, vocab=n.vocab, n_vocab=n.n_vocab, n_ctx=n.n_ctx, eog_tokens=n.eog_tokens,
            kernel=self._draw_kernel,
        )

    def _step(self) -> None:
        for slot in self.slots:
            job = slot.job
            if job is not None and job.first_logits is not None:  # whole prompt cached: nothing to decode
                self._sample(job, -1)
        if self._media is not None:
            self._step_images()
        # A full KV cache makes llama_decode refuse the batch (and leave the cache as it was);
        # freeing room then retrying keeps every step productive.
        t0 = time.perf_counter()
        spec = self._spec
        drafted = spec.drafted_count if spec else 0
        while True:
            fed, sample_at, key = self._fill_batch()
            if not fed:
                return
            self._adapters.apply(key)
            rc = lc.llama_decode(self.native.ctx, self._batch.finalize())
            if rc == 0:
                break
            if not self._on_decode_failure(rc, [(j, t) for j, t, _ in fed]):
                return
        for job, take, drafts in fed:
            job.slot.tokens.extend(job.context[job.n_cached : job.n_cached + take])
            job.n_cached += take
            job.slot.tokens.extend(drafts)  # in KV now; what is not accepted is removed after sampling
            if job.state is SlotState.PREFILLING and job.n_cached >= job.n_prompt:
                job.state = SlotState.GENERATING
        for job, idx, drafts in sample_at:
            if drafts:
                assert spec is not None
                spec.verify(job, idx - len(drafts), drafts, self._sample)
            else:
                self._sample(job, idx)
        if spec is not None and all(take == 1 for _, take, _ in fed):  # decode-only steps teach the policy
            spec.observe(self._batch.n, len(fed), time.perf_counter() - t0, spec.drafted_count - drafted)

    def _fill_batch(self) -> tuple[list[tuple[Job, int, list[int]]], list[tuple[Job, int, list[int]]], LoraKey]:
        batch = self._batch
        batch.clear()
        budget = batch.capacity
        sample_at: list[tuple[Job, int, list[int]]] = []
        fed: list[tuple[Job, int, list[int]]] = []
        active = [s.job for s in self.slots if s.job is not None and len(s.job.context) > s.job.n_cached]
        if self._media is not None:  # a job at an image is fed by _step_images
            active = [j for j in active if not j.spans or text_end(j) > j.n_cached]
        key = self._step_lora_key(active)
        active = [j for j in active if j.lora_key == key]
        # Decoding sequences first (one token each, plus guesses), then prefill in admission order.
        active.sort(key=lambda j: (len(j.context) - j.n_cached > 1, j.t_admit))
        drafts = self._spec.draft(active, budget) if self._spec is not None else {}
        for job in active:
            pending = (text_end(job) if job.spans else len(job.context)) - job.n_cached
            if budget <= 0:
                break
            take = min(pending, budget)
            last = job.n_cached + take == len(job.context)
            guess = drafts.get(job, []) if last else []
            guess = guess[: max(0, budget - take)]
            tokens = job.context[job.n_cached : job.n_cached + take] + guess
            idx = batch.add(tokens, job.n_cached, job.slot.seq, last, logits_from=take - 1 if guess else -1)
            budget -= len(tokens)
            fed.append((job, take, guess))
            if last:
                sample_at.append((job, idx, guess))
        return fed, sample_at, key

    def _step_images(self) -> None:
        """Feed ready image embeddings into their jobs' own sequences (one llama_decode, before the tokens')."""
        media = self._media
        assert media is not None
        jobs = [s.job for s in self.slots if s.job is not None and s.job.spans and s.job.state is SlotState.PREFILLING]
        jobs = [j for j in jobs if not media.blocked(j)]
        if not jobs:
            return
        key = jobs[0].lora_key
        jobs = [j for j in jobs if j.lora_key == key]
        while True:
            fed = media.fill(jobs)
            if not fed:
                return
            self._adapters.apply(key)
            whole = media.needs_non_causal(fed)
            if whole:
                lc.llama_set_causal_attn(self.native.ctx, False)
            rc = lc.llama_decode(self.native.ctx, media.batch.finalize())
            if whole:
                lc.llama_set_causal_attn(self.native.ctx, True)
            if rc == 0:
                break
            if not self._on_decode_failure(rc, [(j, n) for j, n, _ in fed]):
                return
            jobs = [j for j in jobs if j.state is SlotState.PREFILLING]
        for job, n, idx in fed:
            job.slot.tokens.extend(job.context[job.n_cached : job.n_cached + n])
            job.n_cached += n
            if job.n_cached >= job.n_prompt:  # the prompt ended with this image
                job.state = SlotState.GENERATING
                self._sample(job, idx)

    def _run_between_steps(self, fn: Callable[[], None]) -> bool:
        """From any thread: run `fn` on this thread between steps; False when the engine is closing."""
        try:
            self._inbox.post(Command(fn, lambda: None))
        except InboxClosed:
            return False
        return True

    def _fail_image(self, job: Job, error: str) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
        self._finish(job, FinishReason.ERROR, error=error)

    def _step_lora_key(self, active: list[Job]) -> LoraKey:
        """The adapter set this step runs; several sets in use take turns, one step each."""
        keys = sorted({j.lora_key for j in active})
        if len(keys) <= 1:
            return keys[0] if keys else self._adapters.applied
        self._lora_turn = (self._lora_turn + 1) % len(keys)
        return keys[self._lora_turn]

    def _on_decode_failure(self, rc: int, fed: list[tuple[Job, int]]) -> bool:
        """Make room after a refused batch; True when the step should be retried."""
        if rc == 1:
            idle = [s for s in self.slots if s.state is SlotState.IDLE and s.tokens and s.parked is None]
            if idle:  # cached prefixes go first: to host memory, or away when they cannot be parked
                for s in idle:
                    if not self._parking.park(s):
                        s.cut(self.native.mem, 0)
                return True
            victim = max((j for j, _ in fed), key=lambda j: j.t_admit)
            if len(fed) > 1:
                self._preempt(victim)
                return True
            # One sequence alone does not fit: the cache is smaller than its context.
            self._finish(victim, FinishReason.LENGTH)
            return False
        for job, _ in fed:
            self._finish(job, FinishReason.ERROR, error=f"llama_decode failed with code {rc}.")
        return False

    def _preempt(self, job: Job) -> None:
        slot = job.slot
        assert slot is not None
        slot.cut(self.native.mem, 0)
        slot.job = None
        job.slot = None
        job.state = SlotState.QUEUED
        job.n_cached = 0
        job.preempted = True
        self._waiting.appendleft(job)
        logger.debug("KV cache full: preempted {} to recompute later", job.request.request_id)

    def _sample(self, job: Job, idx: int) -> None:
        """Sample the job's next token from batch row `idx`, or from its saved logits (idx -1).

        A failure here is the request's own: it ends that request, never the engine's other requests.
        """
        try:
            self._sample_token(job, idx)
        except Exception as exc:  # noqa: BLE001 - one request's sampling must not stop the engine
            self._finish(job, FinishReason.ERROR, **sampling_failure(exc, job.request.request_id))

    def _sample_token(self, job: Job, idx: int) -> None:
        assert job.chain is not None and job.slot is not None
        params = job.params
        logprobs = None
        saved = job.first_logits
        logits = None  # read from the context only when something needs them (not on a plain token)
        if saved is not None:
            job.first_logits = None
            logits = saved.copy()
        elif job.n_generated == 0 and not job.rewinds:  # the prompt's last token: keep its logits for exact reuse
            logits = self._row(idx)
            job.slot.saved = (len(job.context) - 1, logits.copy())
        if job.needs_logits():
            if logits is None:
                logits = self._row(idx)
            if params.logprobs is not None:
                logprobs = log_softmax(logits)  # the model's own distribution, before any mask
            if job.constraint is not None:
                if job.constraint.is_finished():
                    self._finish(job, FinishReason.STOP)
                    return
                job.constraint.apply_to_logits(logits)
            if job.n_generated < params.min_tokens:
                logits[list(self.native.eog_tokens)] = -np.inf
            banned = job.bans.get(job.n_generated)
            if banned:
                logits[list(banned)] = -np.inf
        if saved is not None or job.chain.direct is not None:
            token = job.chain.sample_from(logits if logits is not None else self._row(idx))
        else:
            token = job.chain.sample(self.native.ctx, idx)
        if job.n_generated == 0:
            job.t_first = time.perf_counter()
        job.n_generated += 1
        self.generated_count += 1
        if (token in self._eog and not params.ignore_eos) or token in job.stop_ids:
            self._finish(job, FinishReason.STOP)
            return
        if job.constraint is not None:
            job.constraint.advance(token)
        job.context.append(token)
        if logprobs is not None:
            job.pending_logprobs.append(token_logprob(logprobs, token, params.logprobs or 0, self._piece))
        got = job.stream.push(token, self.native.piece(token, special=not params.skip_special_tokens))
        if isinstance(got, Rewind):
            self._rewind(job, got)
            return
        if isinstance(got, StopHit):
            self._emit(job, got.release)
            self._finish(job, FinishReason.STOP, stop_string=got.stop)
            return
        self._emit(job, got)
        if job.n_generated >= job.max_new:
            self._finish(job, FinishReason.LENGTH)

    def _row(self, idx: int) -> np.ndarray:
        """Row `idx` of the last batch's logits, as a view (copy it to keep it past the next decode)."""
        return self.native.logits_row(idx)

    def _piece(self, token: int) -> bytes:
        return self.native.piece(token, special=True)

    def _emit(self, job: Job, release: Release) -> None:
        delta = text_delta(release, job.pending_logprobs)
        if delta is not None:
            self._outbox.setdefault(job, []).append(delta)

    def _rewind(self, job: Job, rewind: Rewind) -> None:
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
        job.slot.cut(self.native.mem, keep)
        job.n_cached = keep
        lc.llama_sampler_reset(job.chain.ptr)
        for t in job.context[job.n_prompt :]:
            job.chain.accept(t)
        if job.rewinds > _MAX_REWINDS:
            logger.warning("{}: banned strings forced {} rewinds; ending the output", job.request.request_id, _MAX_REWINDS)
            self._finish(job, FinishReason.STOP)

    def _finish(
        self,
        job: Job,
        reason: FinishReason,
        *,
        stop_string: str | None = None,
        error: str | None = None,
        error_status: int | None = None,
        error_code: str | None = None,
    ) -> None:
        """End the job (wherever it is: the caller takes a waiting job out of the queue)."""
        if job.state is SlotState.DONE:
            return
        job.state = SlotState.DONE
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._emit(job, job.stream.flush())
        slot = job.slot
        if slot is not None:
            slot.job = None
            slot.last_used = time.perf_counter()
            # slot.tokens keeps what is in KV: a later request may reuse it.
            job.slot = None
        if job.chain is not None:
            job.chain.free()
            job.chain = None
        if self._media is not None and job.spans:
            self._media.forget(job)
            job.embd.clear()
        usage = timed_usage(
            job.n_prompt, job.n_generated, job.t_submit, job.t_admit, job.t_first,
            cached_tokens=job.cached_tokens, draft_tokens=job.n_drafted, accepted_draft_tokens=job.n_accepted,
        )
        self.finished_count += 1
        self._inbox.retire()
        self._outbox.setdefault(job, []).append(
            Finished(reason, usage, stop_string=stop_string, error=error, error_status=error_status, error_code=error_code)
        )

    def _deliver(self) -> None:
        """Hand this pass's events to their event loops: one call per loop."""
        if self._outbox:
            deliver_all((job.handle, events) for job, events in self._outbox.items())
            self._outbox.clear()
