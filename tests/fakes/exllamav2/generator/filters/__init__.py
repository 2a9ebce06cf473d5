"""Fake exllamav2.generator.filters: the ExLlamaV2Filter base class."""

from __future__ import annotations

from typing import Any


class ExLlamaV2Filter:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_str = ""

    def begin(self, prefix_str: str) -> None:
        raise NotImplementedError

    def feed(self, token: Any) -> None:
        raise NotImplementedError

    def next(self) -> Any:
        raise NotImplementedError

    def can_mask_logits(self) -> bool:
        return False
