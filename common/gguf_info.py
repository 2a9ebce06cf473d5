"""GGUF metadata of model files that are not loaded, read with the `gguf` package.

Listing and describing models (Ollama's /api/tags and /api/show, for example)
needs the architecture, parameter count, quantization and chat template of
every file in the model directory, loaded or not. `GGUFReader` parses the
whole header, token arrays included, which takes seconds for a large
vocabulary; results are therefore cached per file signature (path, size,
mtime), and callers on the event loop should use `read_gguf_info_async`.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _field_value(reader_field: Any, max_items: int) -> Any:
    """A GGUF key's value as plain Python; None for arrays longer than max_items."""
    from gguf import GGUFValueType

    types = reader_field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(reader_field.data) > max_items:
            return None
        sub = types[-1]
        items = [reader_field.parts[i] for i in reader_field.data]
        if sub == GGUFValueType.STRING:
            return [bytes(p).decode("utf-8", "replace") for p in items]
        return [p.tolist()[0] if len(p) == 1 else p.tolist() for p in items]
    part = reader_field.parts[reader_field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    if types[0] == GGUFValueType.FLOAT32:
        return float(str(part[0]))  # 1e-05, not 9.999999747378752e-06
    value = part.tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value


def _token_text(reader: Any, token_id: Any) -> str:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not isinstance(token_id, int) or not 0 <= token_id < len(tokens.data):
        return ""
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", "replace")


def _quantization(reader: Any, file_type: Any) -> str:
    from gguf import GGMLQuantizationType, LlamaFileType

    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (or an unknown) file type: name it after the most common weight type.
    counts = Counter(t.tensor_type for t in reader.tensors if len(t.shape) > 1)
    if not counts:
        return ""
    try:
        return GGMLQuantizationType(counts.most_common(1)[0][0]).name
    except ValueError:
        return ""


def _read(path: Path) -> GGUFInfo:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    metadata: dict[str, Any] = {}
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIPPED_KEYS:
            continue
        value = _field_value(reader_field, MAX_ARRAY_ITEMS)
        if value is not None:
            metadata[key] = value
    arch = str(metadata.get("general.architecture", ""))
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    metadata["general.parameter_count"] = n_params
    template_field = reader.fields.get("tokenizer.chat_template")
    return GGUFInfo(
        path=str(path),
        architecture=arch,
        parameter_count=n_params,
        size_label=str(metadata.get("general.size_label", "")),
        file_type=_quantization(reader, metadata.get("general.file_type")),
        context_length=int(metadata.get(f"{arch}.context_length", 0) or 0),
        chat_template=_field_value(template_field, 1) if template_field is not None else None,
        bos_token=_token_text(reader, metadata.get("tokenizer.ggml.bos_token_id")),
        eos_token=_token_text(reader, metadata.get("tokenizer.ggml.eos_token_id")),
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
