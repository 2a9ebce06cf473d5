"""LoRA adapters of one llama.cpp model.

Adapters are loaded once per model (`llama_adapter_lora_init`) and applied per
context with `llama_set_adapters_lora`. A context carries one adapter set at a
time, so the scheduler groups each step's batch by adapter set (`LoraKey`) and
keeps each slot's cached prefix tagged with the set it was computed under: KV
made under one set is never reused under another.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc

# A normalized adapter set: (name, scale) pairs, sorted by name, zero scales dropped.
LoraKey = tuple[tuple[str, float], ...]

NO_LORA: LoraKey = ()


def lora_key(pairs: list[tuple[str, float]] | tuple[tuple[str, float], ...]) -> LoraKey:
    """The canonical form of an adapter set; a scale of 0 means the adapter is not applied at all."""
    merged: dict[str, float] = {}
    for name, scale in pairs:
        merged[name] = merged.get(name, 0.0) + float(scale)
    return tuple(sorted((n, s) for n, s in merged.items() if s != 0.0))


@dataclass
class Adapter:
    name: str
    path: Path
    ptr: object  # llama_adapter_lora *
    alpha: float
    n_tensors: int


class LoraError(Exception):
    pass


class AdapterStore:
    """Owns the adapter pointers of one model; only the scheduler thread applies or frees them."""

    def __init__(self, model: object, ctx: object) -> None:
        self._model = model
        self._ctx = ctx
        self.adapters: dict[str, Adapter] = {}
        self.applied: LoraKey = NO_LORA

    def load(self, name: str, path: Path) -> Adapter:
        """Blocking (reads the file); safe from a worker thread, nothing applies it until named."""
        if name in self.adapters:
            return self.adapters[name]
        ptr = lc.llama_adapter_lora_init(self._model, str(path).encode())
        if not ptr:
            raise LoraError(
                f"llama.cpp could not load LoRA '{name}' from {path.name}. Check that it is a GGUF LoRA "
                "adapter made for this base model (convert PEFT adapters with llama.cpp's convert_lora_to_gguf.py)."
            )
        meta = _adapter_meta(ptr)
        adapter = Adapter(name, path, ptr, float(meta.get("adapter.lora.alpha", 0) or 0), len(meta))
        self.adapters[name] = adapter
        return adapter

    def apply(self, key: LoraKey) -> None:
        """Make `key` the context's adapter set (a no-op when it already is)."""
        if key == self.applied:
            return
        # Clear first: this llama.cpp's "already the same set?" check compares only the adapters
        # already set, so going from {a, b} to {a} (or {a} to {a, b}) would be skipped.
        if self.applied:
            lc.llama_set_adapters_lora(self._ctx, None, 0, None)
            self.applied = NO_LORA
        n = len(key)
        if n == 0:
            return
        ptrs = (lc.llama_adapter_lora_p_ctypes * max(n, 1))(*[self.adapters[name].ptr for name, _ in key])
        scales = (ctypes.c_float * max(n, 1))(*[scale for _, scale in key])
        rc = lc.llama_set_adapters_lora(self._ctx, ptrs, n, scales)
        if rc != 0:
            raise LoraError(f"llama.cpp refused the adapter set {key} (code {rc}).")
        self.applied = key

    def free(self, name: str) -> None:
        """Scheduler thread only, and only when no queued or running request uses the adapter."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return
        if any(n == name for n, _ in self.applied):
            self.apply(NO_LORA)
        lc.llama_adapter_lora_free(adapter.ptr)

    def free_all(self) -> None:
        for name in list(self.adapters):
            self.free(name)


def _adapter_meta(ptr: object) -> dict[str, str]:
    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(512)
    for i in range(lc.llama_adapter_meta_count(ptr)):
        if lc.llama_adapter_meta_key_by_index(ptr, i, buf, len(buf)) < 0:
            continue
        key = buf.value.decode("utf-8", "replace")
        if lc.llama_adapter_meta_val_str_by_index(ptr, i, buf, len(buf)) >= 0:
            out[key] = buf.value.decode("utf-8", "replace")
    return out
