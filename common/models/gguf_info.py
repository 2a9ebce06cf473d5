"""GGUF metadata of model files that are not loaded, read with the `gguf` package.

Listing and describing models (Ollama's /api/tags and /api/show, for example)
needs the architecture, parameter count, quantization, context length and
chat template of every file in the model directory, loaded or not. The header
is parsed directly (a fraction of a second even for a large vocabulary), and
results are cached per file signature (path, size, mtime), so listing a model
directory again costs a `stat` per file. Callers on the event loop should use
`read_gguf_info_async`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import mmap
import struct
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

# Arrays longer than this (token lists, merges, scores) are left out of `metadata`.
MAX_ARRAY_ITEMS = 256
# Values kept elsewhere in GGUFInfo, or too large to be useful in a listing.
_SKIPPED_KEYS = frozenset({"tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                           "tokenizer.ggml.token_type", "tokenizer.ggml.scores"})


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    architecture: str = ""
    parameter_count: int = 0
    size_label: str = ""  # general.size_label, e.g. "135M"
    file_type: str = ""  # quantization, e.g. "Q4_1", "Q4_K_M", "F16"
    context_length: int = 0
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    license: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the file could not be read


def human_number(n: int) -> str:
    """Parameter counts the way Ollama prints them: 8B, 7.2B, 135M, 134.52M, 600K."""
    if n >= 1_000_000_000:
        v = n / 1_000_000_000
        return f"{v:.0f}B" if v == int(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f}M" if v == int(v) else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


def parameter_size(info: GGUFInfo) -> str:
    """The model's size label from its metadata, else its counted parameters."""
    if info.size_label:
        return info.size_label
    return human_number(info.parameter_count) if info.parameter_count else ""


# GGUF value type -> struct format (8 is a string, 9 an array).
_SCALARS = types.MappingProxyType({0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                                   11: "q", 12: "d"})
_STRING, _ARRAY = 8, 9


class _Header:
    """A minimal GGUF header parser: keys, values and tensor shapes, nothing else.

    `gguf.GGUFReader` builds a numpy view for every item of every array (tens of
    thousands of vocabulary entries), which takes seconds; listing a model
    directory needs a few scalars, so this reads the header directly and only
    keeps arrays short enough to show (plus the vocabulary, for BOS/EOS text).
    """


    def __init__(self, data: Any) -> None:
        self.data = data
        self.pos = 0
        if bytes(data[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = struct.unpack_from("<I", data, 4)[0]
        self.order = "<" if version < 0x10000 else ">"  # big-endian files have a byte-swapped version
        if (version if self.order == "<" else struct.unpack_from(">I", data, 4)[0]) < 2:
            raise ValueError("GGUF version 1 files are not supported; convert the model again")
        self.pos = 8
        self.n_tensors = self._unpack("Q")
        self.n_kv = self._unpack("Q")

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self._unpack("Q")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def _skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from(self.order + "Q", self.data, self.pos)[0]

    def scalar(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {kind}")
        value = self._unpack(fmt)
        if kind == 6:
            return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        return value

    def value(self, kind: int, keep: int) -> Any:
        """A key's value; arrays longer than `keep` items are skipped and give None."""
        if kind != _ARRAY:
            return self.scalar(kind)
        item_kind = self._unpack("I")
        count = self._unpack("Q")
        if count > keep:
            if item_kind == _STRING:
                for _ in range(count):
                    self._skip_string()
            elif item_kind == _ARRAY:
                for _ in range(count):
                    self.value(_ARRAY, 0)
            else:
                self.pos += count * struct.calcsize(_SCALARS[item_kind])
            return None
        items = [self.value(item_kind, keep) for _ in range(count)]
        if item_kind == 6:  # float arrays keep float32 precision, as gguf's reader gives them
            return [float(np.float32(v)) for v in items]
        return items

    def tensors(self) -> list[tuple[int, int, int]]:
        """(n_dims, n_elements, ggml type) of each tensor."""
        out = []
        for _ in range(self.n_tensors):
            self._skip_string()
            n_dims = self._unpack("I")
            dims = struct.unpack_from(self.order + "Q" * n_dims, self.data, self.pos)
            self.pos += 8 * n_dims
            kind = self._unpack("I")
            self.pos += 8  # data offset
            out.append((n_dims, math.prod(dims), kind))
        return out


def _quantization(file_type: Any, tensors: list[tuple[int, int, int]]) -> str:
    from gguf import GGMLQuantizationType, LlamaFileType

    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (or an unknown) file type: name it after the most common weight type.
    counts = Counter(kind for n_dims, _, kind in tensors if n_dims > 1)
    if not counts:
        return ""
    try:
        return GGMLQuantizationType(counts.most_common(1)[0][0]).name
    except ValueError:
        return ""


def _read(path: Path) -> GGUFInfo:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _Header(memoryview(data))
        try:
            metadata: dict[str, Any] = {}
            tokens: list[str] = []
            chat_template: str | None = None
            for _ in range(header.n_kv):
                key = header.string()
                kind = header._unpack("I")
                if key == "tokenizer.ggml.tokens":
                    tokens = header.value(kind, 1 << 30) or []
                    continue
                value = header.value(kind, MAX_ARRAY_ITEMS)
                if key == "tokenizer.chat_template":
                    chat_template = value if isinstance(value, str) else None
                if key.startswith("GGUF.") or key in _SKIPPED_KEYS or value is None:
                    continue
                metadata[key] = value
            tensors = header.tensors()
        finally:
            header.data.release()
            del header
    arch = str(metadata.get("general.architecture", ""))
    n_params = sum(n for _, n, _ in tensors)
    metadata["general.parameter_count"] = n_params

    def token(key: str) -> str:
        tid = metadata.get(key)
        return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

    return GGUFInfo(
        path=str(path),
        architecture=arch,
        parameter_count=n_params,
        size_label=str(metadata.get("general.size_label", "")),
        file_type=_quantization(metadata.get("general.file_type"), tensors),
        context_length=int(metadata.get(f"{arch}.context_length", 0) or 0),
        chat_template=chat_template,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        license=str(metadata.get("general.license", "")),
        metadata=metadata,
    )


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFInfo:
    # size and mtime_ns are part of the key only: an edited file is read again.
    try:
        return _read(Path(path))
    except Exception as exc:  # noqa: BLE001 - a broken file must not break listings
        logger.warning("Cannot read GGUF metadata of {}: {}. Is the file complete?", path, exc)
        return GGUFInfo(path=path, error=str(exc))


def read_gguf_info(path: Path) -> GGUFInfo:
    """Blocking and cached: the metadata of one GGUF file."""
    try:
        st = path.stat()
    except OSError as exc:
        return GGUFInfo(path=str(path), error=str(exc))
    return _read_cached(str(path), st.st_size, st.st_mtime_ns)


async def read_gguf_info_async(path: Path) -> GGUFInfo:
    """`read_gguf_info` off the event loop (a first read can take seconds)."""
    return await asyncio.to_thread(read_gguf_info, path)
