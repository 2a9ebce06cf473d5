"""Thin owner of the llama.cpp model, context and vocabulary pointers.

Loading, tokenization, token pieces, metadata and the reusable batch live here
(`GgufModel`, shared with the embedding engine); `NativeModel` adds the
generation context. Scheduling lives in scheduler.py.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import llama_cpp as lc
import numpy as np
from loguru import logger

from backends.base import LoadOptions, ModelInfo

_MAX_ROW_VIEWS = 4096  # NativeModel.logits_row's cache bound
_CACHE_TYPES = MappingProxyType({"FP16": 1, "Q8_0": 8, "Q4_0": 2})  # ggml_type ids
_FLASH = MappingProxyType({"auto": -1, "off": 0, "on": 1})


class LoadError(Exception):
    pass


def _forward_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Only problems reach our log.
    if level in (3, 4) and text:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            (logger.error if level == 4 else logger.debug)("llama.cpp: {}", message)


LOG_CALLBACK = lc.llama_log_callback(_forward_log)  # kept alive for the C side; never reassigned


def _init_backend_once() -> None:
    # Both calls are idempotent; llama.cpp's own chatter is routed to loguru (warnings at debug level).
    lc.llama_log_set(LOG_CALLBACK, None)
    lc.llama_backend_init()


class NativeBatch:
    """A llama_batch whose arrays are numpy buffers, filled with vector writes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_flat = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq_flat.ctypes.data
        ptr_t = ctypes.POINTER(ctypes.c_int32)
        self._seq_ptrs = (ptr_t * capacity)(
            *[ctypes.cast(base + 4 * i, ptr_t) for i in range(capacity)]
        )
        self.struct = lc.llama_batch()
        self.struct.token = self.tokens.ctypes.data_as(ptr_t)
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ptr_t)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ptr_t)
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ptr_t))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: list[int], start_pos: int, seq: int, want_last_logits: bool, *, logits_from: int = -1) -> int:
        """Append tokens of one sequence; return the batch index of the last one.

        Logits come for the last token when asked, and for every token from `logits_from` on when set.
        """
        k = len(tokens)
        a, b = self.n, self.n + k
        if k == 1 and logits_from < 0:  # a decoding sequence: scalar writes beat slice writes
            self.tokens[a] = tokens[0]
            self.pos[a] = start_pos
            self.seq_flat[a] = seq
            self.logits[a] = want_last_logits
            self.n = b
            return a
        self.tokens[a:b] = tokens
        self.pos[a:b] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq_flat[a:b] = seq
        self.logits[a:b] = 0
        if want_last_logits:
            self.logits[b - 1] = 1
        if logits_from >= 0:
            self.logits[a + logits_from : b] = 1
        self.n = b
        return b - 1

    def finalize(self) -> lc.llama_batch:
        self.struct.n_tokens = self.n
        return self.struct


def context_params(options: LoadOptions, *, n_ctx: int, n_batch: int, n_seq: int) -> lc.llama_context_params:
    """llama.cpp context parameters every context here shares: sizes, threads, one unified KV cache, no perf counters."""
    threads = options.n_threads or os.cpu_count() or 1
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.kv_unified = True
    cparams.no_perf = True
    return cparams


class GgufModel:
    """A loaded GGUF: model and vocabulary pointers, metadata, tokens; subclasses open the context they need."""

    def __init__(
        self,
        path: Path,
        options: LoadOptions,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        _init_backend_once()
        self.path = path
        self.options = options
        self.model = 0
        self.ctx = 0
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers if options.n_gpu_layers >= 0 else 999
        if progress is not None:

            def _cb(value: float, _user: ctypes.c_void_p) -> bool:
                try:
                    progress(float(value))
                except Exception:  # a progress sink must never abort the load
                    pass
                return True

            self._progress_cb = lc.llama_progress_callback(_cb)
            mparams.progress_callback = self._progress_cb
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise LoadError(
                f"llama.cpp could not load '{path.name}'. Check that it is a complete GGUF file "
                "(re-download it if it was interrupted) and that this llama.cpp build supports its architecture."
            )
        self.model = model
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(model)
        self.metadata = self._read_metadata()
        self._pieces: dict[int, bytes] = {}
        self._pieces_special: dict[int, bytes] = {}

    def _open_context(self, cparams: lc.llama_context_params, failure: str) -> int:
        """Create the context (freeing the model and raising LoadError with `failure` when it cannot)."""
        ctx = lc.llama_init_from_model(self.model, cparams)
        if not ctx:
            self.free()
            raise LoadError(failure)
        self.ctx = ctx
        return ctx

    # -- metadata ---------------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(lc.llama_model_meta_count(self.model)):
            n = lc.llama_model_meta_key_by_index(self.model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            n = lc.llama_model_meta_val_str_by_index(self.model, i, buf, len(buf))
            if n >= len(buf):  # long values (chat templates) need a bigger buffer
                big = ctypes.create_string_buffer(n + 1)
                lc.llama_model_meta_val_str_by_index(self.model, i, big, len(big))
                out[key] = big.value.decode("utf-8", "replace")
            elif n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def description(self) -> str:
        """llama.cpp's one-line description: architecture, size, quantization."""
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.model, desc, len(desc))
        return desc.value.decode("utf-8", "replace")

    # -- tokens -----------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            cap = -n
            arr = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, special)
        return list(arr[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        cache = self._pieces_special if special else self._pieces
        got = cache.get(token)
        if got is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            got = buf.raw[:n]
            cache[token] = got
        return got

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    # -- lifetime ---------------------------------------------------------
    def free(self) -> None:
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = 0
        if self.model:
            lc.llama_model_free(self.model)
            self.model = 0
        logger.debug("freed llama.cpp model {}", self.path.name)


class GgufText:
    """The engine contract's token methods over `self.native` (a GgufModel); a mixin for the llama.cpp engines."""

    native: GgufModel

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.native.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.native.detokenize(tokens, special=special)

    def token_piece(self, token: int) -> bytes:
        return self.native.piece(token, special=True)


class NativeModel(GgufModel):
    """A loaded GGUF with one multi-sequence generation context."""

    def __init__(self, path: Path, options: LoadOptions, progress: Callable[[float], None] | None = None) -> None:
        super().__init__(path, options, progress)
        max_seq_len = options.max_seq_len or min(self.n_ctx_train, 8192)
        cache_size = max(options.cache_size or max_seq_len, max_seq_len)
        self.max_seq_len = max_seq_len
        self.n_slots = max(1, min(options.max_batch_size, lc.llama_max_parallel_sequences()))
        cparams = context_params(options, n_ctx=cache_size, n_batch=options.chunk_size, n_seq=self.n_slots)
        cparams.type_k = _CACHE_TYPES[options.cache_mode]
        cparams.type_v = _CACHE_TYPES[options.cache_mode]
        cparams.flash_attn_type = _FLASH[options.flash_attention]
        ctx = self._open_context(
            cparams,
            f"llama.cpp could not create a context of {cache_size} tokens for '{path.name}'. "
            "Lower cache_size / max_seq_len, or free memory, and load again.",
        )
        self.mem = lc.llama_get_memory(ctx)
        self.n_ctx = lc.llama_n_ctx(ctx)
        self.n_batch = lc.llama_n_batch(ctx)
        self.eog_tokens = tuple(t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.vocab, t))
        self._rows: dict[int, np.ndarray] = {}  # logits row views by address (see logits_row)

    def logits_row(self, idx: int) -> np.ndarray:
        """Row `idx` of the last batch's logits, as a view valid until the next decode (copy it to keep it).

        Views are kept by address: wrapping a pointer in numpy costs ~80 us, a lookup ~1 us, and
        an address llama.cpp hands out for a row always holds a whole row of the current buffer.
        """
        address = ctypes.cast(lc.llama_get_logits_ith(self.ctx, idx), ctypes.c_void_p).value
        if not address:
            raise RuntimeError(f"llama.cpp has no logits for batch row {idx}")
        view = self._rows.get(address)
        if view is None:
            if len(self._rows) >= _MAX_ROW_VIEWS:  # the output buffer moved often: start over
                self._rows.clear()
            view = np.ctypeslib.as_array((ctypes.c_float * self.n_vocab).from_address(address))
            self._rows[address] = view
        return view

    def model_info(self, name: str) -> ModelInfo:
        bos = lc.llama_vocab_bos(self.vocab)
        eos = lc.llama_vocab_eos(self.vocab)
        description = self.description()
        arch = self.metadata.get("general.architecture", "")
        quant = description.split()[-1] if description else ""
        return ModelInfo(
            name=name,
            path=str(self.path),
            backend="llamacpp",
            n_ctx=self.max_seq_len,
            n_ctx_train=self.n_ctx_train,
            n_vocab=self.n_vocab,
            bos_token=self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
            bos_token_id=bos,
            eos_token_id=eos,
            add_bos_token=bool(lc.llama_vocab_get_add_bos(self.vocab)),
            chat_template=self.metadata.get("tokenizer.chat_template"),
            eog_token_ids=self.eog_tokens,
            control_token_ids=tuple(t for t in range(self.n_vocab) if lc.llama_vocab_is_control(self.vocab, t)),
            metadata=self.metadata,
            load_options=self.options.as_dict() | {"max_seq_len": self.max_seq_len, "cache_size": self.n_ctx},
            size_bytes=int(lc.llama_model_size(self.model)),
            parameter_count=int(lc.llama_model_n_params(self.model)),
            quantization=quant,
            architecture=arch,
        )
