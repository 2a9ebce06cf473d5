"""infinity-emb as an embedding engine: a sentence-transformers folder or a cross-encoder, on CPU or CUDA.

infinity's `AsyncEmbeddingEngine` batches concurrent requests itself (its own
queue and worker threads). The model loads in `load` (a worker thread); the
batching loop starts on the serving event loop at the first request, since it
belongs to that loop. Token counts, context checks and token-id inputs use the
folder's own Hugging Face tokenizer, so they agree with what infinity embeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import EngineStats, LoadOptions, ModelInfo
from backends.embedding import EmbeddingEngine, EmbedInput, EmbedResult, RerankResult, normalize_rows
from common.errors import BadRequestError, ModelNotLoadedError

DEFAULT_BATCH = 32


def is_infinity_folder(path: Path) -> bool:
    """A sentence-transformers folder, or a Hugging Face sequence-classification model (a cross-encoder)."""
    if not path.is_dir():
        return False
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return True
    return any(a.endswith("ForSequenceClassification") for a in _read_json(path / "config.json").get("architectures") or [])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _max_input(path: Path, tokenizer: Any, options: LoadOptions) -> int:
    """The longest input the model reads: sentence-transformers' max_seq_length, else the tokenizer's limit."""
    limits = [
        _read_json(path / "sentence_bert_config.json").get("max_seq_length"),
        getattr(tokenizer, "model_max_length", None),
        _read_json(path / "config.json").get("max_position_embeddings"),
    ]
    found = next((int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000), 512)
    return min(found, options.max_seq_len) if options.max_seq_len else found


class InfinityEngine(EmbeddingEngine):
    def __init__(self, engine: Any, tokenizer: Any, path: Path, name: str, options: LoadOptions) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer refuses concurrent use ("Already borrowed")
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._waiting = 0
        self._finished = 0
        capabilities = set(engine.capabilities)
        self.task = "rerank" if "rerank" in capabilities and "embed" not in capabilities else "embed"
        self.pooling = "rank" if self.task == "rerank" else "model"
        self.max_input_tokens = _max_input(path, tokenizer, options)
        self._batch = engine.engine_args.batch_size
        hf = _read_json(path / "config.json")
        dims = _read_json(path / "1_Pooling" / "config.json").get("word_embedding_dimension") or hf.get("hidden_size")
        self.dimensions = 0 if self.task == "rerank" else int(dims or 0)
        self.info = ModelInfo(
            name=name, path=str(path), backend="infinity", n_ctx=self.max_input_tokens,
            n_ctx_train=int(hf.get("max_position_embeddings") or self.max_input_tokens),
            n_vocab=len(tokenizer), bos_token=str(tokenizer.cls_token or ""), eos_token=str(tokenizer.sep_token or ""),
            bos_token_id=tokenizer.cls_token_id if tokenizer.cls_token_id is not None else -1,
            eos_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else -1,
            add_bos_token=True, chat_template=None,
            load_options=options.as_dict() | {"max_seq_len": self.max_input_tokens, "device": options.device},
            size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            architecture=str((hf.get("architectures") or [hf.get("model_type", "")])[0]),
            quantization=str(hf.get("torch_dtype") or ""),
        )

    @classmethod
    def load(cls, path: Path, name: str, options: LoadOptions,
             progress: Callable[[float], None] | None = None) -> InfinityEngine:
        """Blocking: call from a worker thread. The model is a local folder."""
        os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")  # read once, when infinity_emb is imported
        try:
            from infinity_emb import AsyncEmbeddingEngine, EngineArgs
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise BadRequestError(
                f"'{name}' needs infinity-emb, which is not installed ({exc}). Install Parley's embeddings extra: "
                "pip install torch==2.13.0 && pip install '.[embeddings]'.", param="model"
            ) from None
        device = options.device or "cpu"
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        args = EngineArgs(
            model_name_or_path=str(path), engine="torch", device=device, model_warmup=False,
            bettertransformer=False, batch_size=max(DEFAULT_BATCH, options.max_batch_size), served_model_name=name,
        )
        engine = AsyncEmbeddingEngine.from_args(args)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if progress is not None:
            progress(1.0)
        return cls(engine, tokenizer, path, name, options)

    # -- tokens -----------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        with self._tokenizer_lock:
            return list(self._tokenizer(text, add_special_tokens=add_bos)["input_ids"])

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        with self._tokenizer_lock:
            return str(self._tokenizer.decode(tokens, skip_special_tokens=not special))

    def _text(self, item: EmbedInput) -> str:
        return item.text if item.text is not None else self.detokenize(list(item.tokens))

    # -- work -------------------------------------------------------------
    async def _started(self) -> Any:
        if self._closed:
            raise ModelNotLoadedError("The embedding model was unloaded. Load it again and retry.")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._engine.is_running:
                await self._engine.astart()
        return self._engine

    async def embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        if self.task == "rerank":
            raise BadRequestError(f"'{self.info.name}' is a cross-encoder: it scores query-document pairs; send "
                                  "them to /v1/rerank.", param="model")
        engine = await self._started()
        self._waiting += 1
        try:
            vectors, _usage = await engine.embed(sentences=[self._text(i) for i in inputs])
        finally:
            self._waiting -= 1
            self._finished += 1
        return EmbedResult(normalize_rows(np.asarray(vectors, dtype=np.float32)), sum(len(i.tokens) for i in inputs))

    async def rerank(self, query: EmbedInput, documents: list[EmbedInput]) -> RerankResult:
        if self.task != "rerank":
            return await super().rerank(query, documents)
        engine = await self._started()
        docs = [self._text(d) for d in documents]
        self._waiting += 1
        try:
            ranked, _usage = await engine.rerank(query=self._text(query), docs=docs, raw_scores=False)
        finally:
            self._waiting -= 1
            self._finished += 1
        scores = [0.0] * len(docs)
        for r in ranked:
            scores[int(r.index)] = float(r.relevance_score)
        tokens = sum(len(query.tokens) + len(d.tokens) for d in documents)
        return RerankResult(tuple(scores), tokens)

    def stats(self) -> EngineStats:
        return EngineStats(slots_total=self._batch, slots_active=0, queue_depth=self._waiting, kv_cells_total=0,
                           kv_cells_used=0, requests_finished=self._finished)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._engine.is_running:
            await self._engine.astop()
