"""The vision projector of a llama.cpp model, through libmtmd: tokenizing prompts with images, encoding images.

A `Projector` owns one mtmd context (the mmproj GGUF bound to the text model).
`tokenize` turns text with one marker per image into a `MediaPrompt`: text
tokens, and for every image chunk a run of negative placeholder ids derived
from the image's digest (so equal images give equal prompts and prefix reuse
works unchanged). `ImageEncoder` runs the vision tower on its own thread, so a
running batch of text keeps decoding while an image is encoded; its results
come back to the scheduler as a callback, and stay in a small cache keyed by
image digest and chunk.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp import mtmd_cpp as mt
from loguru import logger

from backends.base import ImageInput, MediaPrompt, MediaSpan
from backends.llamacpp.compute import ComputeThread

_TEXT_CHUNK = 0  # MTMD_INPUT_CHUNK_TYPE_TEXT
_IMAGE_CHUNK = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE
_PLACEHOLDER_RANGE = (1 << 30) - 1


class ProjectorError(Exception):
    """The projector cannot be used with this model (message says what to do)."""


def placeholder_ids(key: str, n: int) -> list[int]:
    """Negative ids that stand for the n embeddings of one image chunk: never a real token."""
    base = hash_key(key)
    return [-(1 + ((base + i) % _PLACEHOLDER_RANGE)) for i in range(n)]


def hash_key(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass
class _Chunks:
    """The mtmd chunks of one prompt; freed when the prompt is dropped."""

    ptr: int
    by_key: dict[str, int]  # span key -> chunk pointer

    def __del__(self) -> None:
        if self.ptr:
            mt.mtmd_input_chunks_free(self.ptr)
            self.ptr = 0


class Projector:
    """An mmproj GGUF bound to a loaded text model."""

    def __init__(self, path: Path, model: int, n_threads: int, use_gpu: bool) -> None:
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True
        # Its warm-up computes a graph: on the compute thread, like every graph (compute.py).
        ctx = ComputeThread.shared().call(mt.mtmd_init_from_file, str(path).encode(), model, params)
        if not ctx:
            raise ProjectorError(
                f"libmtmd could not load the projector '{path.name}'. Check that it is an mmproj GGUF made for "
                "this model (its output width must equal the model's hidden size), or load without it (mmproj: none)."
            )
        self.ctx = ctx
        self.path = path
        if not mt.mtmd_support_vision(ctx):
            self.free()
            raise ProjectorError(f"'{path.name}' has no vision encoder (audio projectors are not supported).")
        if mt.mtmd_decode_use_mrope(ctx):
            self.free()
            raise ProjectorError(
                f"'{path.name}' needs M-RoPE positions (the Qwen2-VL family), which this engine does not place yet. "
                "Use a projector with plain positions, or load the model without it (mmproj: none)."
            )
        self.marker = (mt.mtmd_get_marker(ctx) or mt.mtmd_default_marker()).decode()
        # libmtmd makes no promise that tokenizing (which preprocesses images) and encoding may overlap on one
        # context: one call at a time. Both run off the event loop (a worker thread, the encoder thread).
        self._lock = threading.Lock()

    def tokenize(self, text: str, images: list[ImageInput], *, add_bos: bool) -> MediaPrompt:
        """Blocking. ValueError when the markers and the images do not pair up."""
        found = text.count(self.marker)
        if found != len(images):
            raise ValueError(f"the prompt has {found} image markers for {len(images)} images")
        bitmaps = []
        keepalive = []
        try:
            for i, image in enumerate(images):
                buf = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
                keepalive.append(buf)
                bitmap = mt.mtmd_bitmap_init(image.width, image.height, buf)
                if not bitmap:
                    raise ValueError(f"image {i} could not be handed to libmtmd")
                mt.mtmd_bitmap_set_id(bitmap, f"{i}".encode())
                bitmaps.append(bitmap)
            chunks = mt.mtmd_input_chunks_init()
            data = text.encode("utf-8")
            inp = mt.mtmd_input_text(data, len(data), add_bos, True)
            arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            with self._lock:
                rc = mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            owned = _Chunks(chunks, {})
            if rc != 0:
                raise ValueError(f"libmtmd could not tokenize the prompt (code {rc})")
            return self._walk(owned, images)
        finally:
            for bitmap in bitmaps:
                mt.mtmd_bitmap_free(bitmap)

    def _walk(self, owned: _Chunks, images: list[ImageInput]) -> MediaPrompt:
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        seen: dict[int, int] = {}  # image index -> chunks of it so far
        n_out = ctypes.c_size_t()
        for i in range(mt.mtmd_input_chunks_size(owned.ptr)):
            chunk = mt.mtmd_input_chunks_get(owned.ptr, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == _TEXT_CHUNK:
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_out))
                text_tokens = list(ptr[: n_out.value])
                if any(t < 0 for t in text_tokens):
                    raise ValueError("libmtmd produced an unknown token (the projector expects tokens this vocabulary lacks)")
                tokens.extend(text_tokens)
                continue
            if kind != _IMAGE_CHUNK:
                raise ValueError("the prompt produced a non-image media chunk")
            index = int((mt.mtmd_input_chunk_get_id(chunk) or b"0").decode())
            ordinal = seen.get(index, 0)
            seen[index] = ordinal + 1
            n = mt.mtmd_input_chunk_get_n_tokens(chunk)
            if mt.mtmd_input_chunk_get_n_pos(chunk) != n:
                raise ValueError("the projector places images at positions this engine does not support")
            key = f"{images[index].digest}:{ordinal}:{n}"
            owned.by_key[key] = chunk
            start = len(tokens)
            tokens.extend(placeholder_ids(key, n))
            spans.append(MediaSpan(start, start + n, key, bool(mt.mtmd_decode_use_non_causal(self.ctx, chunk))))
        return MediaPrompt(tokens, tuple(spans), owned)

    def encode(self, chunk: int, n_tokens: int, n_embd: int) -> np.ndarray:
        """Blocking: run the vision tower on one image chunk; (n_tokens, n_embd) float32 embeddings."""
        with self._lock:
            rc = ComputeThread.shared().call(mt.mtmd_encode_chunk, self.ctx, chunk)
            if rc != 0:
                raise RuntimeError(f"libmtmd failed to encode the image (code {rc})")
            out = mt.mtmd_get_output_embd(self.ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()

    def free(self) -> None:
        if self.ctx:
            mt.mtmd_free(self.ctx)
            self.ctx = 0


EncodeDone = Callable[[str, "np.ndarray | None", "str | None"], None]


class ImageEncoder:
    """Encodes image chunks on its own thread; keeps recent encodings by key (digest, chunk)."""

    def __init__(self, projector: Projector, n_embd: int, cache_bytes: int = 256 << 20) -> None:
        self.projector = projector
        self.n_embd = n_embd
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._queue: queue.SimpleQueue[tuple[str, MediaPrompt, EncodeDone] | None] = queue.SimpleQueue()
        self.encoded_count = 0
        # Test hook: raise for keys it returns True for (an encoder failure in the middle of a batch).
        self.fail_if: Callable[[str], bool] | None = None
        self._thread = threading.Thread(target=self._run, name="mtmd-encoder", daemon=True)
        self._thread.start()

    def cached(self, key: str) -> np.ndarray | None:
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
        return got

    def request(self, key: str, media: MediaPrompt, done: EncodeDone) -> None:
        """Encode the chunk `key` of `media`; `done(key, embeddings, error)` runs on the encoder thread."""
        self._queue.put((key, media, done))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, media, done = item
            try:
                chunk = media.native.by_key[key]
                if self.fail_if is not None and self.fail_if(key):
                    raise RuntimeError("the encoder was told to fail")
                n = int(key.rsplit(":", 1)[1])
                embd = self.projector.encode(chunk, n, self.n_embd)
            except Exception as exc:  # noqa: BLE001 - reported to the requests that wait for it
                logger.warning("image encode failed: {}", exc)
                done(key, None, f"The image could not be encoded: {exc}. Send another image or retry.")
                continue
            self.encoded_count += 1
            done(key, embd, None)

    def remember(self, key: str, embd: np.ndarray) -> None:
        """Keep an encoding (scheduler thread, the only writer of the cache)."""
        self._cache[key] = embd
        self._cache.move_to_end(key)
        total = sum(a.nbytes for a in self._cache.values())
        while total > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            total -= old.nbytes

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.projector.free()


def route_logs(callback: object) -> None:
    """Send libmtmd's log lines where llama.cpp's go (problems only)."""
    mt.mtmd_log_set(callback, None)
    mt.mtmd_helper_log_set(callback, None)


def n_embd_of(model: int) -> int:
    return int(lc.llama_model_n_embd(model))
