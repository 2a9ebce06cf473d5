"""The llama.cpp engine: a continuous-batching scheduler over one llama.cpp context.

This module is the event-loop side: submission, cancellation, LoRA and cache
commands, stats and close. Everything it asks of the scheduler goes through the
`Inbox` as a typed message (engine_thread.py); the `Scheduler` it owns
(scheduler.py) does the work on the process's llama.cpp compute thread
(compute.py), in turns with other models' schedulers:

1. admit waiting requests into free sequence slots, reusing the longest cached
   prefix (the slot's own, or another slot's via llama_memory_seq_cp, which
   shares KV cells in the unified cache);
2. build one batch: one token for every decoding sequence, then prefill chunks
   for new ones up to n_batch, so a long prompt delays running streams by at
   most one chunk;
3. run one llama_decode (with the adapter set of that step's group, when
   requests choose different LoRA sets);
4. sample every sequence that produced logits with its own native chain,
   checking speculative guesses position by position (speculative.py);
5. assemble text (UTF-8 and stop strings), and hand each request's events to
   its event loop in one call per loop per step.

Prefill and decode are one mechanism: a job's `context` holds every token it
needs in the KV cache (prompt, then sampled tokens); `n_cached` counts those
already decoded. Whatever lies between is fed next.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from backends.base import (
    Engine,
    EngineStats,
    GenerationHandle,
    GenerationRequest,
    ImageInput,
    LoadOptions,
    LoraState,
    MediaPrompt,
)
from backends.engine_thread import Inbox, InboxClosed, InboxFull, RequestHandle, Submit, call_on_thread
from backends.llamacpp import fastdraw
from backends.llamacpp.compute import ComputeThread
from backends.llamacpp.job import Job
from backends.llamacpp.lora import NO_LORA, AdapterStore, LoraError, LoraKey, lora_key
from backends.llamacpp.mtmd import ImageEncoder, Projector, ProjectorError, n_embd_of, route_logs
from backends.llamacpp.native import LOG_CALLBACK, GgufText, NativeModel
from backends.llamacpp.sampler import UNSUPPORTED
from backends.llamacpp.scheduler import Scheduler
from backends.llamacpp.speculative import Drafter, make_drafter
from common.errors import BadRequestError, ServiceUnavailableError


class LlamaCppEngine(GgufText, Engine):
    """One GGUF model serving many requests at once; owns the scheduler and its thread."""

    def __init__(self, native: NativeModel, name: str, options: LoadOptions) -> None:
        self.native = native
        self.info = native.model_info(name)
        self._adapters = AdapterStore(native.model, native.ctx)
        self._default_loras: LoraKey = NO_LORA
        self._drafter: Drafter | None = make_drafter(options, native)
        self._encoder = _load_projector(native, options)
        if self._encoder is not None:
            self.info.modalities = ("text", "vision")
        compute = ComputeThread.shared()
        self._inbox = Inbox(capacity=native.n_slots + options.max_queue, wake=compute.wake)
        self._closing = False
        kernel = fastdraw.load()
        if kernel is None:
            logger.info("Sampling plain-temperature requests with numpy: the compiled sampler is not built "
                        "(`python -m backends.llamacpp.fastdraw` builds it; start.sh does).")
        self._scheduler = Scheduler(
            native, self._inbox, self._adapters, self._drafter, options.draft_max_tokens, encoder=self._encoder,
            draft_adaptive=options.draft_adaptive, draw_kernel=kernel,
        )
        compute.attach(self._scheduler)

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
        except ProjectorError as exc:
            native.free()
            raise BadRequestError(str(exc), param="mmproj", code="projector_load_failed") from exc
        except BaseException:  # e.g. a draft model that does not load or match: free the model too
            native.free()
            raise

    # -- Engine interface -------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        unsupported = UNSUPPORTED & request.params.active_knobs()
        if unsupported:
            logger.warning(
                "llama.cpp has no sampler for {}; accepted but not applied (request {})",
                ", ".join(sorted(unsupported)), request.request_id,
            )
        key = self._default_loras if request.loras is None else self._resolve_loras(request.loras)
        handle = RequestHandle(request, asyncio.get_running_loop(), self._inbox.cancel)
        try:
            self._inbox.post(Submit(Job(handle, self.info.n_ctx, key)))
        except InboxFull as full:
            waiting = max(0, full.outstanding - self._scheduler.stats().slots_active)
            raise ServiceUnavailableError(
                f"The server is busy: {waiting} requests are waiting for a slot. Retry shortly.",
                retry_after=1,
                code="server_busy",
            ) from None
        except InboxClosed:
            raise self._inbox.refusal(self.info.name) from None
        return handle

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    # -- images ------------------------------------------------------------------
    @property
    def image_marker(self) -> str | None:
        return self._encoder.projector.marker if self._encoder is not None else None

    @property
    def encoder(self) -> ImageEncoder | None:
        """The image encoder (None without a projector); tests reach its fault hook through it."""
        return self._encoder

    def tokenize_with_images(self, text: str, images: list[ImageInput], *, add_bos: bool) -> MediaPrompt:
        if self._encoder is None:
            return super().tokenize_with_images(text, images, add_bos=add_bos)
        try:
            return self._encoder.projector.tokenize(text, images, add_bos=add_bos)
        except ValueError as exc:
            raise BadRequestError(
                f"The prompt and its images do not fit together: {exc}. Send one image part per image, and do not "
                f"write the image marker {self.image_marker!r} in text.",
                param=images[0].field if images else "messages",
            ) from None

    async def close(self) -> None:
        # The inbox may be closed already by a failed scheduler: the model and context still need freeing.
        if self._closing:
            return
        self._closing = True
        self._inbox.close()
        await asyncio.to_thread(self._scheduler.ended.wait)
        if self._encoder is not None:
            await asyncio.to_thread(self._encoder.close)
        self._adapters.free_all()
        if self._drafter is not None:
            self._drafter.free()
        self.native.free()

    # -- LoRA adapters --------------------------------------------------------
    supports_lora = True

    async def load_lora(self, name: str, path: Path) -> None:
        try:
            await self._on_scheduler(lambda: self._adapters.load(name, path))
        except LoraError as exc:
            raise BadRequestError(str(exc), param="loras", code="lora_load_failed") from exc

    async def unload_loras(self, names: list[str] | None = None) -> list[str]:
        gone = set(self._adapters.adapters if names is None else names)
        # New requests stop choosing them now; the scheduler ends those that already did.
        self._default_loras = tuple((n, sc) for n, sc in self._default_loras if n not in gone)
        return await self._on_scheduler(lambda: self._scheduler.unload_loras(gone))  # type: ignore[return-value]

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

    # -- cache ------------------------------------------------------------------
    async def clear_cache(self) -> None:
        """Forget every cached prefix of idle slots (running requests keep theirs)."""
        await self._on_scheduler(self._scheduler.clear_cache)

    def check_consistency(self) -> None:
        """Assert each slot's bookkeeping matches the KV cache (call while idle; for tests)."""
        self._scheduler.check_consistency()

    # -- the hand-off to the scheduler thread ------------------------------------
    async def _on_scheduler(self, command: Callable[[], object]) -> object:
        """Run `command` on the scheduler thread between steps; return its result."""
        return await call_on_thread(self._inbox, command, self.info.name)


def _load_projector(native: NativeModel, options: LoadOptions) -> ImageEncoder | None:
    if not options.mmproj:
        return None
    threads = options.n_threads or os.cpu_count() or 1
    route_logs(LOG_CALLBACK)
    projector = Projector(Path(options.mmproj), native.model, threads, use_gpu=options.n_gpu_layers != 0)
    logger.info("vision projector {} loaded ({} per image marker)", Path(options.mmproj).name, projector.marker)
    return ImageEncoder(projector, n_embd_of(native.model))

