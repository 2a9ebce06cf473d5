"""The exllamav2 engine (EXL2 folders, CUDA): ExLlamaV2DynamicGenerator with paged cache and dynamic jobs.

exllamav2 compiles its CUDA extension at import, so it is imported when a
model loads. The dynamic generator batches every `ExLlamaV2DynamicJob` in
`iterate()`; jobloop.py drives it. Cache modes: FP16, Q4, Q6, Q8
(`cache_mode`). Each request's knobs become its own `ExLlamaV2Sampler.Settings`
(sampler.py); stop strings, stop and end-of-generation tokens and banned
strings are the job's. Speculation: a draft model or n-gram drafting. LoRA:
`ExLlamaV2Lora` stacks, set on the generator between requests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.base import LoadOptions
from backends.exllama_base import JobLoopEngine, Loaded
from backends.exllamav2.sampler import UNSUPPORTED, build_settings, constraint_filter
from backends.sampling import SamplingParams
from common.errors import BadRequestError

_CACHES = {"FP16": "ExLlamaV2Cache", "Q4": "ExLlamaV2Cache_Q4", "Q6": "ExLlamaV2Cache_Q6", "Q8": "ExLlamaV2Cache_Q8"}


def _cache_class(lib: Any, mode: str) -> Any:
    name = _CACHES.get(mode.strip().upper())
    if name is None:
        raise BadRequestError(f"cache_mode {mode!r}: exllamav2 offers FP16, Q4, Q6 or Q8.", param="cache_mode")
    return getattr(lib, name)


def _load(lib: Any, folder: str, n_ctx: int, cache_tokens: int, mode: str) -> tuple[Any, Any]:
    config = lib.ExLlamaV2Config(folder)
    config.max_seq_len = n_ctx
    config.prepare()
    model = lib.ExLlamaV2(config)
    cache = _cache_class(lib, mode)(model, max_seq_len=cache_tokens, lazy=True)
    model.load_autosplit(cache)
    return model, cache


class ExLlamaV2Engine(JobLoopEngine):
    backend = "exllamav2"
    unsupported = UNSUPPORTED

    @classmethod
    def _load_library(cls, path: Path, options: LoadOptions, n_ctx: int, cache_tokens: int,
                      progress: Callable[[float], None] | None) -> Loaded:
        import exllamav2 as lib  # CUDA only: compiled at import
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        draft = draft_cache = None
        if options.draft_mode == "model" and options.draft_model_path:
            draft, draft_cache = _load(lib, options.draft_model_path, n_ctx, cache_tokens, options.cache_mode)
        model, cache = _load(lib, str(path), n_ctx, cache_tokens, options.cache_mode)
        if progress is not None:
            progress(0.9)
        tokenizer = lib.ExLlamaV2Tokenizer(model.config)
        generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=options.max_batch_size,
            max_chunk_size=options.chunk_size,
            draft_model=draft,
            draft_cache=draft_cache,
            num_draft_tokens=options.draft_max_tokens,
            use_ngram_draft=options.draft_mode == "ngram",
            paged=True,
        )
        return Loaded(lib, model, cache, tokenizer, generator, draft, draft_cache)

    def _quantization(self, options: LoadOptions) -> str:
        return f"EXL2 (cache {options.cache_mode})"

    def _constraint_filter(self, new_state: Callable[[], Any]) -> Any:
        return constraint_filter(self._model, self._tokenizer, new_state)

    def _job(self, params: SamplingParams, **job: Any) -> Any:
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        info = self.info
        settings = build_settings(ExLlamaV2Sampler, params, eog=info.eog_token_ids, n_vocab=info.n_vocab)
        return ExLlamaV2DynamicJob(gen_settings=settings, **job)

    # -- LoRA: ExLlamaV2Lora stacks, set on the generator while no job runs ---------------------
    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        return self._lib.ExLlamaV2Lora.from_directory(self._model, str(folder), lora_scaling=scale)

    def _lib_unload_lora(self, adapter: Any) -> None:
        adapter.unload()

    def _lib_activate(self, adapters: list[Any]) -> None:
        self._generator.set_loras(adapters or None)
