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
from backends.exllama_base import JobLoopEngine, context_length, folder_model_info, load_vocab
from backends.exllamav2.sampler import UNSUPPORTED, build_settings, constraint_filter
from backends.queued_handle import QueuedHandle
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
    unsupported = UNSUPPORTED

    def __init__(self, lib: Any, model: Any, cache: Any, tokenizer: Any, generator: Any, draft: Any,
                 path: Path, name: str, options: LoadOptions, n_ctx: int, cache_tokens: int) -> None:
        self._lib = lib
        self._model = model
        self._cache = cache
        self._tokenizer = tokenizer
        self._generator = generator
        self._draft = draft
        vocab = load_vocab(path)
        info = folder_model_info(path, name, "exllamav2", vocab, n_ctx, options, f"EXL2 (cache {options.cache_mode})")
        self._start(generator, vocab, info, options, cache_tokens)

    @classmethod
    def load(cls, path: Path, name: str, options: LoadOptions,
             progress: Callable[[float], None] | None = None) -> ExLlamaV2Engine:
        import exllamav2 as lib  # CUDA only: compiled at import
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        n_ctx = context_length(path, options)
        cache_tokens = max(options.cache_size or n_ctx, n_ctx)
        cache_tokens += -cache_tokens % 256  # the paged cache allocates whole pages
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
        engine = cls(lib, model, cache, tokenizer, generator, draft, path, name, options, n_ctx, cache_tokens)
        if progress is not None:
            progress(1.0)
        return engine

    def _make_job(self, handle: QueuedHandle) -> Any:
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        request = handle.request
        params = request.params
        info = self.info
        stops: list[int | str] = [*params.stop, *params.stop_token_ids]
        if not params.ignore_eos:
            stops += list(info.eog_token_ids)
        limit = max(1, info.n_ctx - len(request.prompt_tokens))
        filters = []
        if request.constraint is not None:
            filters.append(constraint_filter(self._model, self._tokenizer, request.constraint.new_state))
        return ExLlamaV2DynamicJob(
            input_ids=torch.tensor([request.prompt_tokens], dtype=torch.long),
            max_new_tokens=min(params.max_tokens or limit, limit),
            min_new_tokens=params.min_tokens,
            gen_settings=build_settings(ExLlamaV2Sampler, params, eog=info.eog_token_ids, n_vocab=info.n_vocab),
            seed=params.seed,
            stop_conditions=stops,
            decode_special_tokens=not params.skip_special_tokens,
            return_logits=params.logprobs is not None,
            filters=filters or None,
            banned_strings=list(params.banned_strings) or None,
            identifier=request.request_id,
        )

    # -- LoRA: ExLlamaV2Lora stacks, set on the generator while no job runs ---------------------
    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        return self._lib.ExLlamaV2Lora.from_directory(self._model, str(folder), lora_scaling=scale)

    def _lib_unload_lora(self, adapter: Any) -> None:
        adapter.unload()

    def _lib_activate(self, adapters: list[Any]) -> None:
        self._generator.set_loras(adapters or None)

    def _free(self) -> None:
        for model in (self._model, self._draft):
            if model is not None:
                try:
                    model.unload()
                except Exception:  # noqa: BLE001 - freeing is best effort
                    pass
