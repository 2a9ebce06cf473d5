"""The exllamav3 engine (EXL3 folders, CUDA): Model.from_config, a paged Cache, and Generator jobs.

exllamav3 imports only with CUDA (it builds its extension at import), so the
library is imported when a model loads, never at module import. The
`Generator` batches every job in `iterate()`; jobloop.py drives it. Each
request becomes one `Job` with its own sampler (sampler.py), stop conditions
(stop strings, stop token ids, end-of-generation ids unless ignore_eos),
banned strings (the job rewinds them itself), min_tokens, seed, logits for
logprobs, and a constraint filter. Speculation: a draft model
(`draft_mode: model`) or n-gram drafting (`draft_mode: ngram`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.base import LoadOptions
from backends.exllama_base import JobLoopEngine, cache_mode_bits, context_length, folder_model_info, load_vocab
from backends.exllamav3.sampler import UNSUPPORTED, build_sampler, constraint_filter
from backends.queued_handle import QueuedHandle

PAGE_SIZE = 256  # exllamav3's cache page: cache sizes are multiples of it
NGRAM_MATCH_MIN = 3


def _cache(lib: Any, model: Any, tokens: int, mode: str, batch: int) -> Any:
    bits = cache_mode_bits(mode)
    if bits is None:
        return lib.Cache(model, max_num_tokens=tokens, max_batch_size=batch)
    return lib.Cache(model, max_num_tokens=tokens, max_batch_size=batch, layer_type=lib.CacheLayer_quant,
                     k_bits=bits[0], v_bits=bits[1])


class ExLlamaV3Engine(JobLoopEngine):
    unsupported = UNSUPPORTED

    def __init__(self, lib: Any, model: Any, cache: Any, tokenizer: Any, generator: Any, draft: tuple[Any, Any] | None,
                 path: Path, name: str, options: LoadOptions, n_ctx: int, cache_tokens: int) -> None:
        self._lib = lib
        self._model = model
        self._cache = cache
        self._tokenizer = tokenizer
        self._draft = draft
        vocab = load_vocab(path)
        bits = cache_mode_bits(options.cache_mode)
        quant = "EXL3" + ("" if bits is None else f" (cache {bits[0]},{bits[1]} bits)")
        info = folder_model_info(path, name, "exllamav3", vocab, n_ctx, options, quant)
        self._start(generator, vocab, info, options, cache_tokens)

    @classmethod
    def load(cls, path: Path, name: str, options: LoadOptions,
             progress: Callable[[float], None] | None = None) -> ExLlamaV3Engine:
        import exllamav3 as lib  # CUDA only: compiled at import

        n_ctx = context_length(path, options)
        cache_tokens = PAGE_SIZE * math.ceil(max(options.cache_size or n_ctx, n_ctx) / PAGE_SIZE)
        draft: tuple[Any, Any] | None = None
        draft_model = draft_cache = None
        if options.draft_mode == "model" and options.draft_model_path:
            draft_config = lib.Config.from_directory(options.draft_model_path)
            draft_model = lib.Model.from_config(draft_config)
            draft_cache = _cache(lib, draft_model, cache_tokens, options.cache_mode, options.max_batch_size)
            draft_model.load(progressbar=False)
            draft = (draft_model, draft_cache)
        config = lib.Config.from_directory(str(path))
        model = lib.Model.from_config(config)
        cache = _cache(lib, model, cache_tokens, options.cache_mode, options.max_batch_size)
        model.load(progressbar=False)
        if progress is not None:
            progress(0.9)
        tokenizer = lib.Tokenizer.from_config(config)
        generator = lib.Generator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=options.max_batch_size,
            max_chunk_size=options.chunk_size,
            draft_model=draft_model,
            draft_cache=draft_cache,
            num_draft_tokens=options.draft_max_tokens if draft_model is not None else None,
            ngram_match_min=NGRAM_MATCH_MIN if options.draft_mode == "ngram" else 0,
        )
        engine = cls(lib, model, cache, tokenizer, generator, draft, path, name, options, n_ctx, cache_tokens)
        if progress is not None:
            progress(1.0)
        return engine

    def _make_job(self, handle: QueuedHandle) -> Any:
        import torch

        request = handle.request
        params = request.params
        info = self.info
        stops: list[int | str] = [*params.stop, *params.stop_token_ids]
        if not params.ignore_eos:
            stops += list(info.eog_token_ids)
        limit = max(1, info.n_ctx - len(request.prompt_tokens))
        filters = []
        if request.constraint is not None:
            filters.append(constraint_filter(self._lib, self._tokenizer, request.constraint.new_state))
        return self._lib.Job(
            input_ids=torch.tensor([request.prompt_tokens], dtype=torch.long),
            max_new_tokens=min(params.max_tokens or limit, limit),
            min_new_tokens=params.min_tokens,
            sampler=build_sampler(self._lib, params, eog=info.eog_token_ids, n_vocab=info.n_vocab),
            seed=params.seed,
            stop_conditions=stops,
            decode_special_tokens=not params.skip_special_tokens,
            return_logits=params.logprobs is not None,
            filters=filters or None,
            banned_strings=list(params.banned_strings) or None,
            identifier=request.request_id,
        )

    # -- LoRA: exllamav3 applies every loaded adapter; loading one activates it -----------------
    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        from exllamav3.model.lora import LoRA

        return LoRA.from_directory(self._model, str(folder), lora_scaling=scale)

    def _lib_unload_lora(self, adapter: Any) -> None:
        adapter.unload()

    def _free(self) -> None:
        for model in (self._model, *(self._draft[:1] if self._draft else ())):
            try:
                model.unload()
            except Exception:  # noqa: BLE001 - freeing is best effort
                pass
