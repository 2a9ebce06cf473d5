"""The transformers engine: Hugging Face models (folders, or GGUF de-quantized) on CPU or CUDA.

Requests are batched by transformers' own continuous batching
(`model.init_continuous_batching()`, paged attention); there is never one
`generate()` per request. This module loads the model, sizes the paged cache
from the load options, and is the event-loop side (submit, cancel, stats,
close); batching.py is the side that runs on the manager's thread.

Cache sizing: transformers would otherwise take a share of all free memory
(on CPU that starves everything else), so `num_blocks` comes from
`cache_size` (default: the context length) and `max_batch_tokens` from
`chunk_size`. Admission reserves each request's whole growth, so a full
cache makes requests wait, never fail.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from backends.base import Engine, EngineStats, GenerationHandle, GenerationRequest, LoadOptions, ModelInfo
from backends.hf_vocab import HFVocab, HFVocabText
from backends.engine_thread import Inbox, InboxClosed, RequestHandle
from backends.transformers.batching import Batcher, Close, TickQueue
from backends.transformers.job import TfJob
from backends.transformers.sampler import UNSUPPORTED
from common.errors import BadRequestError

BLOCK_SIZE = 32
DEFAULT_CPU_CONTEXT = 4096  # when neither max_seq_len nor cache_size is set, on CPU


def _model_source(path: Path) -> tuple[str, dict[str, Any], int]:
    """(folder, extra from_pretrained kwargs, bytes on disk) for a GGUF file, a folder with one, or an HF folder."""
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}, path.stat().st_size
    ggufs = sorted(path.glob("*.gguf"))
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if ggufs and not weights:
        return str(path), {"gguf_file": ggufs[0].name}, ggufs[0].stat().st_size
    return str(path), {}, sum(f.stat().st_size for f in weights)


def _gguf_adds_bos(file: Path) -> bool:
    """llama.cpp's rule: the GGUF's tokenizer.ggml.add_bos_token, else true for SentencePiece vocabularies only.

    transformers' GGUF tokenizer loader adds BOS for every Llama-family vocabulary, which doubles the
    BOS of chat templates that begin with it (SmolLM2's <|im_start|>)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(file)).fields
    flag = fields.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        return bool(flag.contents())
    model = fields.get("tokenizer.ggml.model")
    return model is not None and model.contents() == "llama"


class TransformersEngine(HFVocabText, Engine):
    def __init__(self, model: Any, tokenizer: Any, name: str, path: Path, options: LoadOptions, size: int) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        n_vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.vocab = HFVocab(tokenizer.backend_tokenizer, n_vocab)
        n_ctx_train = int(getattr(config, "max_position_embeddings", 0) or 2048)
        want = options.max_seq_len or min(n_ctx_train, DEFAULT_CPU_CONTEXT)
        cache_tokens = max(options.cache_size or want, BLOCK_SIZE)
        num_blocks = math.ceil((cache_tokens + 1) / BLOCK_SIZE) + 1
        n_ctx = min(want, (num_blocks - 1) * BLOCK_SIZE - 1)
        max_batch_tokens = max(options.chunk_size, options.max_batch_size)
        self.info = self._model_info(name, path, n_ctx, n_ctx_train, options, size)

        from transformers import GenerationConfig

        generation_config = GenerationConfig(
            do_sample=False,  # the batcher decides every token; the manager takes the one it left standing
            eos_token_id=-1,  # and ends requests itself
            max_new_tokens=n_ctx,
            num_blocks=num_blocks,
            block_size=BLOCK_SIZE,
            max_batch_tokens=max_batch_tokens,
            scheduler="fifo",
        )
        manager = model.init_continuous_batching(generation_config=generation_config, streaming=False)
        self._inbox = Inbox(capacity=options.max_batch_size + options.max_queue)
        self._batcher = Batcher(
            manager,
            self._inbox,
            piece=self.vocab.piece,
            special_ids=self.vocab.special_ids,
            eog=self.info.eog_token_ids,
            n_vocab=n_vocab,
            device=torch.device(model.device),
            max_batch_size=options.max_batch_size,
            num_blocks=num_blocks,
            block_size=BLOCK_SIZE,
        )
        manager.input_queue = TickQueue(self._batcher.tick, self._inbox.wait)
        manager.logit_processor = self._batcher
        manager.do_sample = False
        self._manager = manager
        self._closing = False
        manager.start()
        self._watcher = threading.Thread(target=self._watch, name=f"transformers-{name}", daemon=True)
        self._watcher.start()

    @classmethod
    def load(
        cls,
        path: Path,
        name: str,
        options: LoadOptions,
        progress: Callable[[float], None] | None = None,
    ) -> TransformersEngine:
        """Blocking: call from a worker thread."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from backends.transformers.compat import repair_cpu_memory_probe

        repair_cpu_memory_probe()
        folder, extra, size = _model_source(path)
        cuda = torch.cuda.is_available()
        if options.n_threads and not cuda:
            torch.set_num_threads(options.n_threads)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        if progress is not None:
            progress(0.2)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.bfloat16 if cuda else torch.float32,
            attn_implementation="sdpa_paged",
            **extra,
        )
        if cuda:
            model = model.to("cuda")
        if progress is not None:
            progress(0.9)
        engine = cls(model, tokenizer, name, path, options, size)
        if progress is not None:
            progress(1.0)
        return engine

    def _model_info(self, name: str, path: Path, n_ctx: int, n_ctx_train: int, options: LoadOptions,
                    size: int) -> ModelInfo:
        tok, config = self.tokenizer, self.model.config
        gguf = self._gguf_file(path)
        add_bos = _gguf_adds_bos(gguf) if gguf is not None else bool(getattr(tok, "add_bos_token", False))
        eos_ids = self.model.generation_config.eos_token_id
        eos_list = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        if not eos_list and tok.eos_token_id is not None:
            eos_list = [tok.eos_token_id]
        eog = set(eos_list)
        eog |= self.vocab.end_of_turn_ids()
        eos = eos_list[0] if eos_list else -1
        bos = tok.bos_token_id if tok.bos_token_id is not None else -1
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return ModelInfo(
            name=name,
            path=str(path),
            backend="transformers",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=self.vocab.n_vocab,
            bos_token=self.vocab.piece(bos).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.vocab.piece(eos).decode("utf-8", "replace") if eos >= 0 else "",
            bos_token_id=bos,
            eos_token_id=eos,
            add_bos_token=add_bos and bos >= 0,
            chat_template=template,
            eog_token_ids=tuple(sorted(eog)),
            control_token_ids=tuple(sorted(self.vocab.special_ids)),
            load_options=options.as_dict(),
            size_bytes=size,
            parameter_count=sum(p.numel() for p in self.model.parameters()),
            quantization=str(self.model.dtype).removeprefix("torch."),
            architecture=str(getattr(config, "model_type", "")),
        )

    @staticmethod
    def _gguf_file(path: Path) -> Path | None:
        _, extra, _ = _model_source(path)
        name = extra.get("gguf_file")
        return None if name is None else (path if path.is_file() else path / name)

    # -- Engine interface -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        params = request.params
        if params.banned_strings:
            raise BadRequestError(
                "The transformers backend cannot apply banned strings (it cannot rewind a sequence in its batch). "
                "Remove 'banned_strings' or serve the model with the llama.cpp or exllama backends.",
                param="banned_strings",
            )
        if request.loras:
            self.set_loras(list(request.loras))
        if not request.prompt_tokens:
            raise BadRequestError("The prompt is empty: send at least one token.", param="prompt")
        unsupported = UNSUPPORTED & params.active_knobs()
        if unsupported:
            logger.warning(
                "transformers has no logits processor for {}; accepted but not applied (request {})",
                ", ".join(sorted(unsupported)), request.request_id,
            )
        handle = RequestHandle(request, asyncio.get_running_loop(), self._inbox.cancel)
        self._inbox.submit(TfJob(handle, self.info.n_ctx), self.info.name)
        return handle

    def stats(self) -> EngineStats:
        return self._batcher.stats()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._inbox.post(Close())
        except InboxClosed:
            pass
        await asyncio.to_thread(self._watcher.join)

    def _watch(self) -> None:
        """Wait for the manager's thread to end, then end what it left (all of it, if it failed)."""
        self._manager.join()
        failed = not self._closing
        if failed:
            logger.error("transformers' generation loop stopped on its own; ending its requests")
        self._batcher.shut_down(failed)
