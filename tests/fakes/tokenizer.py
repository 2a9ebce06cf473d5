"""The fake libraries' tokenizer over tinylm's vocabulary (both exllama tokenizers answer these calls)."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.tinylm import N_SPECIAL, SPECIALS


class FakeTokenizer:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.eos_token_id = 2
        self.bos_token_id = 1

    def piece_bytes(self, token: int, decode_special: bool) -> bytes:
        if token < N_SPECIAL:
            return SPECIALS[token].encode() if decode_special else b""
        return bytes([token - N_SPECIAL])

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return [self.piece_bytes(t, include_special_tokens).decode("utf-8", "replace") for t in range(N_SPECIAL + 256)]
