"""What the exllamav2 and exllamav3 engines share: the event-loop side over a `JobLoop`, and model facts from the folder.

An EXL2/EXL3 model is a Hugging Face folder (config.json, tokenizer.json,
tokenizer_config.json, quantized safetensors). Tokens, their bytes and the
chat template come from those files through `HFVocab`, the same way the
transformers engine reads them; generation goes through the library's own
generator (jobloop.py). `JobLoopEngine` does the load (context length, cache
size in whole pages), the job's shared arguments (stops, limits, filters,
banned strings) and freeing; each engine loads its library and names its job
and sampler. LoRA: both libraries apply PEFT adapters to the whole model rather
than per job, so a request may only use the active set.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from backends.base import Engine, EngineStats, GenerationHandle, GenerationRequest, LoadOptions, LoraState, ModelInfo
from backends.hf_vocab import HFVocab, HFVocabText
from backends.sampling import SamplingParams
from backends.engine_thread import Command, InboxClosed, RequestHandle, call_on_thread
from backends.jobloop import JobLoop
from common.errors import BadRequestError

PAGE_SIZE = 256  # the paged caches of both libraries allocate whole pages of this many tokens


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_vocab(folder: Path) -> HFVocab:
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise BadRequestError(
            f"'{folder.name}' has no tokenizer.json; copy it from the original model's folder.", param="model_name"
        )
    config = read_json(folder / "config.json")
    return HFVocab(Tokenizer.from_file(str(file)), int(config.get("vocab_size") or 0) or None)


def folder_model_info(folder: Path, name: str, backend: str, vocab: HFVocab, n_ctx: int,
                      options: LoadOptions, quantization: str) -> ModelInfo:
    config = read_json(folder / "config.json")
    tok_config = read_json(folder / "tokenizer_config.json")
    gen_config = read_json(folder / "generation_config.json")

    def token_of(key: str) -> int:
        value = tok_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        tid = vocab.token_id(value) if isinstance(value, str) else None
        return tid if tid is not None else int(config.get(f"{key}_id", -1) if config.get(f"{key}_id") is not None else -1)

    bos, eos = token_of("bos_token"), token_of("eos_token")
    eos_cfg = gen_config.get("eos_token_id", config.get("eos_token_id"))
    eog = {eos} if eos >= 0 else set()
    eog.update(eos_cfg if isinstance(eos_cfg, list) else ([eos_cfg] if isinstance(eos_cfg, int) else []))
    eog |= vocab.end_of_turn_ids()
    template = tok_config.get("chat_template")
    if not isinstance(template, str):
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return ModelInfo(
        name=name,
        path=str(folder),
        backend=backend,
        n_ctx=n_ctx,
        n_ctx_train=int(config.get("max_position_embeddings") or n_ctx),
        n_vocab=vocab.n_vocab,
        bos_token=vocab.piece(bos).decode("utf-8", "replace") if bos >= 0 else "",
        eos_token=vocab.piece(eos).decode("utf-8", "replace") if eos >= 0 else "",
        bos_token_id=bos,
        eos_token_id=eos,
        add_bos_token=bool(tok_config.get("add_bos_token", False)) and bos >= 0,
        chat_template=template,
        eog_token_ids=tuple(sorted(t for t in eog if t >= 0)),
        control_token_ids=tuple(sorted(vocab.special_ids)),
        load_options=options.as_dict(),
        size_bytes=size,
        quantization=quantization,
        architecture=str(config.get("model_type", "")),
    )


def context_length(folder: Path, options: LoadOptions) -> int:
    config = read_json(folder / "config.json")
    return int(options.max_seq_len or config.get("max_position_embeddings") or 4096)


@dataclass(frozen=True)
class Loaded:
    """What a library load returns: its module, the model, cache, tokenizer, generator and any draft model."""

    lib: Any
    model: Any
    cache: Any
    tokenizer: Any
    generator: Any
    draft: Any = None
    draft_cache: Any = None


class JobLoopEngine(HFVocabText, Engine):
    """The event-loop side; subclasses load the library and say how a request becomes a job."""

    backend = ""
    unsupported: frozenset[str] = frozenset()

    def __init__(self, loaded: Loaded, path: Path, name: str, options: LoadOptions, n_ctx: int,
                 cache_tokens: int) -> None:
        self._lib = loaded.lib
        self._model = loaded.model
        self._cache = loaded.cache
        self._tokenizer = loaded.tokenizer
        self._generator = loaded.generator
        self._draft = loaded.draft
        self._draft_cache = loaded.draft_cache
        self.vocab = vocab = load_vocab(path)
        self.info = folder_model_info(path, name, self.backend, vocab, n_ctx, options, self._quantization(options))
        self._active_loras: dict[str, float] = {}
        # name -> (PEFT folder, (library adapter, its scale) once applied)
        self._loras: dict[str, tuple[Path, tuple[Any, float] | None]] = {}
        self._loop = JobLoop(
            self._generator,
            self._make_job,
            vocab.piece,
            slots=options.max_batch_size,
            capacity=options.max_batch_size + options.max_queue,
            kv_cells=cache_tokens,
            name=f"{self.backend}-{name}",
        )

    @classmethod
    def load(cls, path: Path, name: str, options: LoadOptions,
             progress: Callable[[float], None] | None = None) -> JobLoopEngine:
        n_ctx = context_length(path, options)
        cache_tokens = PAGE_SIZE * math.ceil(max(options.cache_size or n_ctx, n_ctx) / PAGE_SIZE)
        loaded = cls._load_library(path, options, n_ctx, cache_tokens, progress)
        engine = cls(loaded, path, name, options, n_ctx, cache_tokens)
        if progress is not None:
            progress(1.0)
        return engine

    @classmethod
    def _load_library(cls, path: Path, options: LoadOptions, n_ctx: int, cache_tokens: int,
                      progress: Callable[[float], None] | None) -> Loaded:
        """Import the library (CUDA only) and load the model, its cache and any draft; report 0.9 once loaded."""
        raise NotImplementedError

    def _quantization(self, options: LoadOptions) -> str:
        raise NotImplementedError

    def _make_job(self, handle: RequestHandle) -> Any:  # runs on the loop's thread
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
            filters.append(self._constraint_filter(request.constraint.new_state))
        return self._job(
            params,
            input_ids=torch.tensor([request.prompt_tokens], dtype=torch.long),
            max_new_tokens=min(params.max_tokens or limit, limit),
            min_new_tokens=params.min_tokens,
            seed=params.seed,
            stop_conditions=stops,
            decode_special_tokens=not params.skip_special_tokens,
            return_logits=params.logprobs is not None,
            filters=filters or None,
            banned_strings=list(params.banned_strings) or None,
            identifier=request.request_id,
        )

    def _constraint_filter(self, new_state: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def _job(self, params: SamplingParams, **job: Any) -> Any:
        """The library's job from the shared arguments plus this request's sampler."""
        raise NotImplementedError

    def _free(self) -> None:
        """Release the library's models (after the loop stopped); best effort."""
        for model in (self._model, self._draft):
            if model is not None:
                try:
                    model.unload()
                except Exception:  # noqa: BLE001 - freeing is best effort
                    pass

    # -- Engine interface -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if request.loras is not None and dict(request.loras) != self._active_loras:
            raise BadRequestError(
                f"The {self.info.backend} backend applies adapters to the whole model, so a request can only use "
                f"the active set ({self._active_loras or 'none'}). Change it with POST /v1/lora/load.",
                param="loras",
            )
        if not request.prompt_tokens:
            raise BadRequestError("The prompt is empty: send at least one token.", param="prompt")
        unsupported = self.unsupported & request.params.active_knobs()
        if unsupported:
            logger.warning(
                "{} has no sampler for {}; accepted but not applied (request {})",
                self.info.backend, ", ".join(sorted(unsupported)), request.request_id,
            )
        handle = RequestHandle(request, asyncio.get_running_loop(), self._loop.inbox.cancel)
        self._loop.inbox.submit(handle, self.info.name)
        return handle

    def stats(self) -> EngineStats:
        return self._loop.stats()

    async def close(self) -> None:
        self._loop.inbox.close()
        await asyncio.to_thread(self._loop.join)
        self._free()

    # -- LoRA (PEFT folders; the whole model) --------------------------------------------------
    supports_lora = True

    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        raise NotImplementedError

    def _lib_unload_lora(self, adapter: Any) -> None:
        raise NotImplementedError

    def _lib_activate(self, adapters: list[Any]) -> None:
        """Make exactly these loaded adapters the model's (loop thread, no job running)."""

    async def load_lora(self, name: str, path: Path) -> None:
        self._loras[name] = (peft_folder(path, self.info.backend), None)

    async def unload_loras(self, names: list[str] | None = None) -> list[str]:
        gone = sorted(n for n in (self._loras if names is None else names) if n in self._loras)
        if gone:
            self.set_loras([(n, s) for n, s in self._active_loras.items() if n not in gone])
        for n in gone:
            self._loras.pop(n, None)
        return gone

    def loras(self) -> list[LoraState]:
        return [LoraState(n, str(p), self._active_loras.get(n, 0.0)) for n, (p, _) in self._loras.items()]

    def set_loras(self, pairs: list[tuple[str, float]]) -> None:
        missing = [n for n, _ in pairs if n not in self._loras]
        if missing:
            raise BadRequestError(f"LoRA {missing[0]!r} is not loaded; load it first with POST /v1/lora/load.",
                                  param="loras")
        wanted = dict(pairs)
        self._active_loras = wanted

        def apply() -> None:  # loop thread
            self.require_idle()
            for name, (folder, applied) in list(self._loras.items()):
                if applied is not None and (name not in wanted or applied[1] != wanted[name]):
                    self._lib_unload_lora(applied[0])
                    self._loras[name] = (folder, None)
            for name, scale in wanted.items():
                folder, applied = self._loras[name]
                if applied is None:
                    self._loras[name] = (folder, (self._lib_load_lora(folder, scale), scale))
            self._lib_activate([self._loras[n][1][0] for n in wanted])  # type: ignore[index]

        def failed() -> None:
            logger.warning("adapters not changed: the model was unloading")

        def run() -> None:
            try:
                apply()
            except Exception as exc:  # noqa: BLE001 - reported in the log; requests keep the previous set
                logger.error("could not apply LoRA adapters {}: {}", list(wanted), exc)

        try:
            self._loop.inbox.post(Command(run, failed))
        except InboxClosed:
            raise self._loop.inbox.refusal(self.info.name) from None

    async def on_loop(self, command: Callable[[], object]) -> object:
        """Run `command` on the generator's thread, between iterations."""
        return await call_on_thread(self._loop.inbox, command, self.info.name)

    def require_idle(self) -> None:
        """Adapters change the whole model: only between requests (loop thread)."""
        if not self._loop.idle():
            raise BadRequestError(
                f"The {self.info.backend} backend changes adapters only while no request runs; retry when idle.",
                param="loras", code="server_busy",
            )


def peft_folder(path: Path, backend: str) -> Path:
    folder = path if path.is_dir() else path.parent
    if not (folder / "adapter_config.json").is_file():
        raise BadRequestError(
            f"The {backend} backend loads PEFT adapters (a folder with adapter_config.json and "
            f"adapter_model.safetensors); '{path.name}' is not one. GGUF adapters work with the llama.cpp backend.",
            param="loras",
        )
    return folder


def cache_mode_bits(mode: str) -> tuple[int, int] | None:
    """'FP16' -> None; 'Q4'/'Q6'/'Q8' -> (k, v) bits; 'K,V' (e.g. '4,6') -> those bits."""
    m = mode.strip().upper()
    if m in ("FP16", "F16", ""):
        return None
    if m in ("Q4", "Q6", "Q8"):
        bits = int(m[1])
        return bits, bits
    try:
        k, v = (int(x) for x in m.split(","))
    except ValueError:
        raise BadRequestError(f"cache_mode {mode!r} is not FP16, Q4, Q6, Q8 or 'K,V' bits.", param="cache_mode") from None
    return k, v
