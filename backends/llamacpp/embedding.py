"""GGUF embedding and rerank models on llama.cpp: many inputs of many requests in one forward pass.

One context is created with `embeddings = true` and the pooling the GGUF
declares (`<arch>.pooling_type`: mean, cls, last, rank), or the load option
`pooling` in its place. Requests hand their inputs to one worker thread
(`_Work`, through a queue); each pass the thread takes every waiting input,
packs as many as fit (`n_seq_max` sequences, and for encoders about 1,024
tokens, since their attention spans the whole pass) into one
`llama_batch` with one sequence id each, runs one forward pass, and reads one
pooled vector (or, with rank pooling, one score) per sequence with
`llama_get_embeddings_seq`. Encoder models (BERT) have no KV cache and run
with `llama_encode`; decoder embedding models (Qwen3-Embedding and the like)
run with `llama_decode`, and their cache is cleared after every pass. The
pass itself runs on the process's compute thread (compute.py), between the
chat models' steps: while those are generating, a pass takes only about
SHARED_PASS_SECONDS of work (`pass_budget`), so a streaming reply waits for
one short pass at a time instead of for a whole batch of long inputs.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as lc
import numpy as np
from loguru import logger

from backends.base import EngineStats, LoadOptions, ModelInfo
from backends.llamacpp.compute import ComputeThread
from backends.embedding import EmbeddingEngine, EmbedInput, EmbedResult, RerankResult, normalize_rows
from backends.llamacpp.native import GgufModel, GgufText, LoadError, NativeBatch, context_params
from common.errors import BadRequestError, ModelNotLoadedError

_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_POOLING_NAME = {v: k for k, v in _POOLING.items()}
MAX_SEQUENCES = 32  # sequences per forward pass unless max_batch_size asks for more
MIN_BATCH_TOKENS = 2048
# An encoder attends over the whole packed batch (masked per sequence), so its cost grows with the square of
# the tokens in a pass: passes of about this many tokens keep that waste small while still batching.
ENCODER_PASS_TOKENS = 1024
# While chat models generate on the compute thread, an embedding pass takes about this much time (or one input),
# and before its speed is known, this many tokens.
SHARED_PASS_SECONDS = 0.05
SHARED_PASS_FIRST_TOKENS = 256


def pass_budget(full: int, contended: bool, tokens_per_second: float) -> int:
    """Tokens one pass may take: `full` while nothing else computes; while engine loops run passes, what the
    model embeds in SHARED_PASS_SECONDS at its measured speed (the caller still takes one input of any size)."""
    if not contended:
        return full
    share = int(tokens_per_second * SHARED_PASS_SECONDS) if tokens_per_second > 0 else SHARED_PASS_FIRST_TOKENS
    return max(1, min(full, share))


@dataclass(eq=False)
class _Work:
    """One request's inputs, handed to the worker thread; its results go back to `future` on `loop`."""

    inputs: list[tuple[int, ...]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    out: np.ndarray = field(init=False)
    left: int = field(init=False)
    cancelled: bool = False  # set from the event loop when the caller went away

    def __post_init__(self) -> None:
        self.left = len(self.inputs)


class _Stop:
    """Tells the worker thread to finish (pending work fails with an unload error)."""


class EmbeddingNative(GgufModel):
    """A GGUF model with one embeddings context; used by the worker thread only (besides tokenizing)."""

    def __init__(self, path: Path, options: LoadOptions, progress: Callable[[float], None] | None) -> None:
        super().__init__(path, options, progress)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.max_input = min(options.max_seq_len or self.n_ctx_train, self.n_ctx_train) or 512
        self.n_batch = max(MIN_BATCH_TOKENS, self.max_input)
        self.n_seq = max(1, min(lc.llama_max_parallel_sequences(), max(MAX_SEQUENCES, options.max_batch_size)))
        # n_ubatch = n_batch (context_params): an encoder must see a whole sequence in one micro-batch
        cparams = context_params(options, n_ctx=self.n_batch, n_batch=self.n_batch, n_seq=self.n_seq)
        cparams.embeddings = True
        cparams.pooling_type = -1 if not options.pooling else _POOLING[options.pooling]
        self._open_context(cparams, f"llama.cpp could not create an embeddings context for '{path.name}'. Free "
                                    "memory or lower max_seq_len, and load again.")
        self.mem = lc.llama_get_memory(self.ctx)  # None for encoders (BERT): nothing to clear
        self.pooling = _POOLING_NAME.get(lc.llama_pooling_type(self.ctx), "none")
        if self.pooling == "none":
            self.free()
            raise LoadError(f"'{path.name}' declares no pooling, so it gives one vector per token. Load it with "
                            "the option pooling: mean, cls or last (its model card says which).")
        self.n_out = max(1, lc.llama_model_n_cls_out(self.model)) if self.pooling == "rank" else self.n_embd
        self.pass_tokens = self.n_batch if self.mem else max(ENCODER_PASS_TOKENS, self.max_input)
        self.batch = NativeBatch(self.n_batch)

    def forward(self, sequences: list[tuple[int, ...]]) -> np.ndarray:
        """One pass over sequences that fit one batch; a row of outputs per sequence."""
        self.batch.clear()
        for seq, tokens in enumerate(sequences):
            self.batch.add(list(tokens), 0, seq, False, logits_from=0)
        run = lc.llama_decode if self.mem else lc.llama_encode
        rc = run(self.ctx, self.batch.finalize())
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to embed a batch (code {rc})")
        out = np.empty((len(sequences), self.n_out), dtype=np.float32)
        for seq in range(len(sequences)):
            out[seq] = np.ctypeslib.as_array(lc.llama_get_embeddings_seq(self.ctx, seq), shape=(self.n_out,))
        if self.mem:
            lc.llama_memory_clear(self.mem, True)
        return out


class _Worker:
    """The thread that owns the context: gathers waiting inputs into passes and answers each request."""

    def __init__(self, native: EmbeddingNative) -> None:
        self.native = native
        self.compute = ComputeThread.shared()
        self.inbox: queue.SimpleQueue[_Work | _Stop] = queue.SimpleQueue()
        self.active = 0  # sequences in the pass running now
        self.waiting = 0  # requests not finished
        self.requests_finished = 0
        self.passes = 0
        self.tokens_per_second = 0.0  # measured over the last passes (0: none yet)

    def run(self) -> None:
        pending: list[tuple[_Work, int]] = []  # (request, input index) not yet computed
        stopping = False
        while not stopping:
            if not pending:
                item = self.inbox.get()
                stopping = self._take(item, pending)
            while not stopping:  # everything that arrived meanwhile joins this pass
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                stopping = self._take(item, pending)
            if stopping:
                break
            pending = [(w, i) for w, i in pending if not w.cancelled]
            if pending:
                pending = self._pass(pending)
        self.native.free()

    def _take(self, item: _Work | _Stop, pending: list[tuple[_Work, int]]) -> bool:
        if isinstance(item, _Stop):
            self._fail_all(pending)
            return True
        item.out = np.empty((len(item.inputs), self.native.n_out), dtype=np.float32)
        pending.extend((item, i) for i in range(len(item.inputs)))
        return False

    def _pass(self, pending: list[tuple[_Work, int]]) -> list[tuple[_Work, int]]:
        chosen: list[tuple[_Work, int]] = []
        tokens = 0
        budget = pass_budget(self.native.pass_tokens, self.compute.contended, self.tokens_per_second)
        for work, i in pending:
            n = len(work.inputs[i])
            full = len(chosen) >= self.native.n_seq or tokens + n > self.native.pass_tokens
            if full or (chosen and tokens + n > budget):
                break
            chosen.append((work, i))
            tokens += n
        if not chosen:  # cannot happen (inputs are cut to max_input <= n_batch); never spin on it
            work = pending[0][0]
            self._resolve(work, RuntimeError(f"an input of {len(work.inputs[pending[0][1]])} tokens exceeds the batch"))
            return [(w, i) for w, i in pending if w is not work]
        self.active = len(chosen)
        try:
            rows = self.compute.call(self._timed_forward, [w.inputs[i] for w, i in chosen], tokens)
        except Exception as exc:  # noqa: BLE001 - every request in the pass hears of it
            logger.exception("Embedding pass failed")
            for work in {w for w, _ in chosen}:
                self._resolve(work, exc)
            failed = {w for w, _ in chosen}
            return [(w, i) for w, i in pending[len(chosen):] if w not in failed]
        finally:
            self.active = 0
        for (work, i), row in zip(chosen, rows):
            work.out[i] = row
            work.left -= 1
            if work.left == 0:
                self._resolve(work, work.out)
        return pending[len(chosen):]

    def _timed_forward(self, sequences: list[tuple[int, ...]], tokens: int) -> np.ndarray:
        """The pass, on the compute thread; its speed sets later passes' share while chat models generate."""
        start = time.perf_counter()
        rows = self.native.forward(sequences)
        rate = tokens / max(time.perf_counter() - start, 1e-6)
        self.tokens_per_second = rate if not self.tokens_per_second else 0.5 * (self.tokens_per_second + rate)
        self.passes += 1
        return rows

    def _resolve(self, work: _Work, result: np.ndarray | BaseException) -> None:
        self.requests_finished += 1

        def deliver() -> None:
            if work.future.done():
                return
            if isinstance(result, BaseException):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)

        try:
            work.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the caller's loop is gone
            pass

    def _fail_all(self, pending: list[tuple[_Work, int]]) -> None:
        error = ModelNotLoadedError("The embedding model was unloaded while embedding. Load it again and retry.")
        for work in {w for w, _ in pending}:
            self._resolve(work, error)


class LlamaCppEmbeddingEngine(GgufText, EmbeddingEngine):
    """A GGUF embedding (or rank-pooling reranker) model; all requests share one worker thread's passes."""

    def __init__(self, native: EmbeddingNative, name: str, options: LoadOptions) -> None:
        self.native = native
        self.pooling = native.pooling
        self.task = "rerank" if native.pooling == "rank" else "embed"
        self.dimensions = 0 if self.task == "rerank" else native.n_embd
        self.max_input_tokens = native.max_input
        self.info = self._info(name, options)
        self._worker = _Worker(native)
        self._closed = False
        self._thread = threading.Thread(target=self._worker.run, name=f"embed-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path: Path, name: str, options: LoadOptions,
             progress: Callable[[float], None] | None = None) -> LlamaCppEmbeddingEngine:
        """Blocking: call from a worker thread."""
        if options.pooling and options.pooling not in _POOLING:
            raise BadRequestError(f"pooling '{options.pooling}' is not one of mean, cls, last, rank.", param="pooling")
        native = EmbeddingNative(path, options, progress)
        try:
            return cls(native, name, options)
        except BaseException:
            native.free()
            raise

    def _info(self, name: str, options: LoadOptions) -> ModelInfo:
        n = self.native
        bos = lc.llama_vocab_bos(n.vocab)
        eos = lc.llama_vocab_eos(n.vocab)
        description = n.description()
        return ModelInfo(
            name=name, path=str(n.path), backend="llamacpp_embedding", n_ctx=n.max_input, n_ctx_train=n.n_ctx_train,
            n_vocab=n.n_vocab, bos_token="", eos_token="", bos_token_id=bos, eos_token_id=eos,
            add_bos_token=bool(lc.llama_vocab_get_add_bos(n.vocab)), chat_template=None,
            load_options=options.as_dict() | {"max_seq_len": n.max_input, "pooling": n.pooling},
            size_bytes=int(lc.llama_model_size(n.model)), parameter_count=int(lc.llama_model_n_params(n.model)),
            quantization=description.split()[-1] if description else "",
            architecture=description.split()[0] if description else "",
        )

    # -- work ------------------------------------------------------------------
    async def _run(self, sequences: list[tuple[int, ...]]) -> np.ndarray:
        if self._closed:
            raise ModelNotLoadedError("The embedding model was unloaded. Load it again and retry.")
        loop = asyncio.get_running_loop()
        work = _Work(sequences, loop, loop.create_future())
        self._worker.waiting += 1
        self._worker.inbox.put(work)
        try:
            return await work.future
        except asyncio.CancelledError:
            work.cancelled = True
            raise
        finally:
            self._worker.waiting -= 1

    async def embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        if self.task == "rerank":
            raise BadRequestError(f"'{self.info.name}' is a reranker (rank pooling): it scores query-document "
                                  "pairs; send them to /v1/rerank.", param="model")
        rows = await self._run([i.tokens for i in inputs])
        return EmbedResult(normalize_rows(rows), sum(len(i.tokens) for i in inputs))

    async def rerank(self, query: EmbedInput, documents: list[EmbedInput]) -> RerankResult:
        if self.task != "rerank":
            return await super().rerank(query, documents)
        sep = lc.llama_vocab_sep(self.native.vocab)
        pairs = [self.pair(query.tokens, d.tokens, sep) for d in documents]
        rows = await self._run(pairs)
        scores = tuple(1.0 / (1.0 + math.exp(-float(r[0]))) for r in rows)
        return RerankResult(scores, sum(len(p) for p in pairs))

    def pair(self, query: tuple[int, ...], document: tuple[int, ...], sep: int) -> tuple[int, ...]:
        """[CLS] query [SEP] document [SEP], as llama-server builds a rerank input, cut to fit."""
        doc = document[1:] if document and document[0] == lc.llama_vocab_bos(self.native.vocab) else document
        tokens = tuple(query) + tuple(doc)
        if len(tokens) > self.max_input_tokens:
            tokens = tokens[: self.max_input_tokens - 1] + ((sep,) if sep >= 0 else tokens[-1:])
        return tokens

    def stats(self) -> EngineStats:
        w = self._worker
        return EngineStats(slots_total=self.native.n_seq, slots_active=w.active, queue_depth=max(0, w.waiting),
                           kv_cells_total=0, kv_cells_used=0, requests_finished=w.requests_finished)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._worker.inbox.put(_Stop())
        await asyncio.to_thread(self._thread.join)
