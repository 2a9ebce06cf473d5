"""Continuous-batching scheduler over one llama.cpp context.

One thread owns the context. Each step it
1. drops cancelled jobs and admits waiting ones into free sequence slots,
   reusing the longest cached prefix (the slot's own, or another slot's via
   llama_memory_seq_cp, which shares KV cells in the unified cache);
2. builds one batch: one token for every decoding sequence, then prefill
   chunks for new ones up to n_batch, so a long prompt delays running streams
   by at most one chunk;
3. runs one llama_decode (with the adapter set of that step's group, when
   requests choose different LoRA sets);
4. samples every sequence that produced logits with its own native chain,
   checking speculative guesses position by position (speculative.py);
5. assembles text (UTF-8 and stop strings), and hands each job's events to its
   event loop in one call per loop per step.

Prefill and decode are one mechanism: a job's `context` holds every token it
needs in the KV cache (prompt, then sampled tokens); `n_cached` counts those
already decoded. Whatever lies between is fed next.

This module is the event-loop side (submission, cancellation, LoRA and cache
commands); scheduler.py is the thread side.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import llama_cpp as lc
from loguru import logger

from backends.base import (
    Engine,
    EngineStats,
    Event,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    LoadOptions,
    LoraState,
)
from backends.llamacpp.job import Job, Slot
from backends.llamacpp.lora import NO_LORA, AdapterStore, LoraError, LoraKey, lora_key
from backends.llamacpp.native import NativeBatch, NativeModel
from backends.llamacpp.sampler import UNSUPPORTED
from backends.llamacpp.scheduler import Scheduler
from backends.llamacpp.speculative import Drafter, make_drafter
from common.errors import BadRequestError, ModelNotLoadedError, ServiceUnavailableError


class LlamaCppEngine(Scheduler, Engine):
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
        self._adapters = AdapterStore(native.model, native.ctx)
        self._default_loras: LoraKey = NO_LORA
        self._lora_turn = 0
        self._drafter: Drafter | None = make_drafter(options, native)
        self._draft_max = options.draft_max_tokens
        self._drafted_count = 0
        self._accepted_count = 0
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
        native = NativeModel(path, options, progress)
        try:
            return cls(native, name, options)
        except BaseException:  # e.g. a draft model that does not load or match: free the model too
            native.free()
            raise

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
            draft_tokens=self._drafted_count,
            accepted_draft_tokens=self._accepted_count,
        )

    async def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self._adapters.free_all()
        if self._drafter is not None:
            self._drafter.free()
        self.native.free()

    # -- LoRA adapters --------------------------------------------------------
    supports_lora = True

    async def _on_scheduler(self, command: Callable[[], object]) -> object:
        """Run `command` on the scheduler thread between steps; return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()

        def run() -> None:
            try:
                result = command()
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        with self._cv:
            if self._closed:
                raise ModelNotLoadedError(f"Model '{self.info.name}' is unloading. Load a model and retry.")
            self._commands.append(run)
            self._wake = True
            self._cv.notify()
        return await done

    async def load_lora(self, name: str, path: Path) -> None:
        try:
            await self._on_scheduler(lambda: self._adapters.load(name, path))
        except LoraError as exc:
            raise BadRequestError(str(exc), param="loras", code="lora_load_failed") from exc

    async def unload_loras(self, names: list[str] | None = None) -> list[str]:
        gone = set(self._adapters.adapters if names is None else names)

        def command() -> list[str]:
            outbox: dict[Job, list[Event]] = {}
            users = [j for j in list(self._waiting) + [s.job for s in self._slots if s.job] if j is not None]
            for job in users:
                if any(n in gone for n, _ in job.lora_key):
                    self._finish(job, FinishReason.UNLOAD, outbox, error="A LoRA adapter this request used was unloaded.")
            self._waiting = deque(j for j in self._waiting if not j.finished)
            for slot in self._slots:
                if slot.job is None and any(n in gone for n, _ in slot.lora_key):
                    slot.cut(self.native.mem, 0)
                    slot.lora_key = NO_LORA
            self._default_loras = tuple((n, sc) for n, sc in self._default_loras if n not in gone)
            freed = [n for n in gone if n in self._adapters.adapters]
            for n in freed:
                self._adapters.free(n)
            self._deliver(outbox)
            return sorted(freed)

        return await self._on_scheduler(command)  # type: ignore[return-value]

    def set_loras(self, pairs: list[tuple[str, float]]) -> None:
        self._default_loras = self._resolve_loras(pairs)

    def loras(self) -> list[LoraState]:
        active = dict(self._default_loras)
        return [LoraState(a.name, str(a.path), active.get(a.name, 0.0)) for a in self._adapters.adapters.values()]

    def _resolve_loras(self, pairs: list[tuple[str, float]] | tuple[tuple[str, float], ...]) -> LoraKey:
        loaded = self._adapters.adapters
        for name, _ in pairs:
            if name not in loaded:
                have = ", ".join(loaded) or "none"
                raise BadRequestError(
                    f"LoRA '{name}' is not loaded on model '{self.info.name}' (loaded: {have}). "
                    "Load it first with POST /v1/lora/load (admin key).",
                    param="loras",
                )
        return lora_key(pairs)

    async def clear_cache(self) -> None:
        """Forget every cached prefix of idle slots (running requests keep theirs)."""

        def command() -> None:
            for slot in self._slots:
                if slot.job is None and slot.tokens:
                    slot.cut(self.native.mem, 0)

        await self._on_scheduler(command)

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
        job.lora_key = self._default_loras if request.loras is None else self._resolve_loras(request.loras)
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


def _settle(fut: asyncio.Future[object], result: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
