"""A loaded model and the leases requests hold on it.

`LoadedModel` is one engine with its chat template, load options and
per-model defaults. A `ModelLease` marks a running request: the manager never
unloads a model with leases to make room or for idleness. A lease knows only the
callback that gives it back (`on_release`), not the manager that handed it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import final

from backends.base import Engine, LoadOptions, ModelInfo
from common.formats.constraints import ConstraintCompiler, TokenizerAdapter
from common.models.files import ModelDefaults, combine_presets
from common.models.presets import Preset
from common.formats.templating import ChatTemplate


@dataclass
class LoadedModel:
    name: str
    engine: Engine
    template: ChatTemplate | None
    options: LoadOptions | None = None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    keep_alive: float | None = None  # idle seconds before unloading; None: never
    backend: str | None = None
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # leases held by running requests
    _max_token_bytes: int = 0
    _compiler: ConstraintCompiler | None = None
    _compiler_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def is_embedding(self) -> bool:
        """An embedding or rerank model (backends/embedding.py): it cannot generate text."""
        return bool(getattr(self.engine, "is_embedding", False))

    def preset(self, server: Preset | None) -> Preset | None:
        """The sampler preset for a request: the server's, with this model's defaults on top."""
        return combine_presets(server, self.defaults.sampling)

    def busy(self) -> bool:
        if self.active:
            return True
        stats = self.engine.stats()
        return bool(stats.slots_active or stats.queue_depth)

    def idle_seconds(self) -> float:
        return 0.0 if self.active else max(0.0, time.monotonic() - self.last_used)

    def may_fit(self, chars: int, tokens: int) -> bool:
        """False only when a text of `chars` characters certainly needs more than `tokens` tokens.

        A character is at least one byte and a token covers at most the longest token text of the
        vocabulary, which is read (a fraction of a second) only when a text is longer than `tokens`
        characters, so ordinary requests never pay for it."""
        return chars <= tokens or chars <= tokens * self.max_token_bytes

    @property
    def max_token_bytes(self) -> int:
        """Bytes of the longest token text in the vocabulary (read once)."""
        if not self._max_token_bytes:
            pieces = (len(self.engine.token_piece(t)) for t in range(self.info.n_vocab))
            self._max_token_bytes = max(max(pieces, default=1), 1)
        return self._max_token_bytes

    async def constraint_compiler(self) -> ConstraintCompiler:
        """Built on first use (reading the whole vocabulary takes a fraction of a second)."""
        async with self._compiler_lock:
            if self._compiler is None:
                self._compiler = await asyncio.to_thread(self._build_compiler)
            return self._compiler

    def _build_compiler(self) -> ConstraintCompiler:
        info, engine = self.info, self.engine
        pieces = [engine.token_piece(t) for t in range(info.n_vocab)]
        adapter = TokenizerAdapter.from_pieces(
            pieces,
            info.eog_token_ids or (info.eos_token_id,),
            info.control_token_ids,
            bos_token=info.bos_token_id,
            n_vocab=info.n_vocab,
            tokenize=lambda data: engine.tokenize(data.decode("utf-8", "replace"), add_bos=False, special=False),
        )
        return ConstraintCompiler(adapter)


@final
class ModelLease:
    """One running request's hold on a model; release it when the request ends (idempotent).

    `with lease:` releases on exit unless `detach()` handed the release to a
    streaming response, which calls it when the stream ends.
    """

    def __init__(self, model: LoadedModel, on_release: Callable[[LoadedModel], None]) -> None:
        self.model = model
        self._on_release = on_release
        self._released = False
        self._detached = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._on_release(self.model)

    def detach(self) -> Callable[[], None]:
        self._detached = True
        return self.release

    def __enter__(self) -> ModelLease:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._detached or exc[0] is not None:
            self.release()
