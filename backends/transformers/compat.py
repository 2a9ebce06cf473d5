"""One repair to transformers 4.57's continuous batching on CPU, applied when the engine loads.

`PagedAttentionMemoryHandler.get_available_memory` reads the device's total
memory from a helper that answers None on CPU, so building the paged cache
fails there with a TypeError even when `num_blocks` and `max_batch_tokens` are
both given (the footprint check runs anyway). transformers 5 measures CPU
memory; here the same number comes from the operating system. The repair
replaces that one static method, is applied once, and leaves CUDA untouched
(it defers to the original whenever CUDA is available).
"""

from __future__ import annotations

import os
from collections.abc import Callable


def _available_ram() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def repair_cpu_memory_probe() -> None:
    import torch
    from transformers.generation.continuous_batching import cache as cb_cache

    handler = cb_cache.PagedAttentionMemoryHandler
    original: Callable[[float], int] = handler.get_available_memory
    if getattr(original, "_parley_cpu_probe", False):
        return

    def get_available_memory(max_memory_percent: float = 1.0) -> int:
        if torch.cuda.is_available():
            return original(max_memory_percent)
        return int(_available_ram() * max_memory_percent)

    get_available_memory._parley_cpu_probe = True  # type: ignore[attr-defined]
    handler.get_available_memory = staticmethod(get_available_memory)  # type: ignore[method-assign]
