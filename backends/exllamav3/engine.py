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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.base import LoadOptions
from backends.exllama_base import JobLoopEngine, Loaded, cache_mode_bits
from backends.exllamav3.sampler import UNSUPPORTED, build_sampler, constraint_filter
from backends.sampling import SamplingParams

NGRAM_MATCH_MIN = 3


def _cache(lib: Any, model: Any, tokens: int, mode: str, batch: int) -> Any:
    bits = cache_mode_bits(mode)
    if bits is None:
        return lib.Cache(model, max_num_tokens=tokens, max_batch_size=batch)
    return lib.Cache(model, max_num_tokens=tokens, max_batch_size=batch, layer_type=lib.CacheLayer_quant,
                     k_bits=bits[0], v_bits=bits[1])


class ExLlamaV3Engine(JobLoopEngine):
    backend = "exllamav3"
    unsupported = UNSUPPORTED

    @classmethod
    def _load_library(cls, path: Path, options: LoadOptions, n_ctx: int, cache_tokens: int,
                      progress: Callable[[float], None] | None) -> Loaded:
        import exllamav3 as lib  # CUDA only: compiled at import

        draft_model = draft_cache = None
        if options.draft_mode == "model" and options.draft_model_path:
            draft_config = lib.Config.from_directory(options.draft_model_path)
            draft_model = lib.Model.from_config(draft_config)
            draft_cache = _cache(lib, draft_model, cache_tokens, options.cache_mode, options.max_batch_size)
            draft_model.load(progressbar=False)
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
        return Loaded(lib, model, cache, tokenizer, generator, draft_model, draft_cache)

    def _quantization(self, options: LoadOptions) -> str:
        bits = cache_mode_bits(options.cache_mode)
        return "EXL3" + ("" if bits is None else f" (cache {bits[0]},{bits[1]} bits)")

    def _constraint_filter(self, new_state: Callable[[], Any]) -> Any:
        return constraint_filter(self._lib, self._tokenizer, new_state)

    def _job(self, params: SamplingParams, **job: Any) -> Any:
        info = self.info
        return self._lib.Job(sampler=build_sampler(self._lib, params, eog=info.eog_token_ids, n_vocab=info.n_vocab),
                             **job)

    # -- LoRA: exllamav3 applies every loaded adapter; loading one activates it -----------------
    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        from exllamav3.model.lora import LoRA

        return LoRA.from_directory(self._model, str(folder), lora_scaling=scale)

    def _lib_unload_lora(self, adapter: Any) -> None:
        adapter.unload()
