"""A Hugging Face `tokenizers` vocabulary as the engine contract needs it: raw token bytes, encode, decode.

The torch engines (transformers, exllamav2, exllamav3) read their vocabulary
through this one class, so a token's bytes mean the same thing in each: the
text stream assembles UTF-8 from them and the constraint compiler matches
grammars against them. Byte-level vocabularies (GPT-2 style, `Ġ` for a space)
map each character back to its byte; SentencePiece ones turn `▁` into a space
and `<0xAB>` into that byte; added tokens are their own text. `HFVocabText`
gives those engines the contract's tokenize, detokenize and token_piece.
"""

from __future__ import annotations

import json
import re
import threading
from functools import cache
from typing import Any

from backends.base import ModelInfo

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table (printable bytes stand for themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _uses_byte_level(backend: Any) -> bool:
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return False
    return "ByteLevel" in json.dumps(spec.get("decoder") or {}) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {})


class HFVocab:
    """Token bytes and (de)tokenization over a `tokenizers.Tokenizer`; thread-safe."""

    def __init__(self, backend: Any, n_vocab: int | None = None) -> None:
        self.backend = backend
        self._lock = threading.Lock()  # encode_special_tokens is a switch on the shared tokenizer
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self.n_vocab = max(size, n_vocab or 0)
        byte_level = _uses_byte_level(backend)
        decoder = _byte_decoder()
        pieces: list[bytes] = []
        for i in range(self.n_vocab):
            text = backend.id_to_token(i)
            if text is None:
                pieces.append(b"")
            elif i in added:
                pieces.append(added[i].content.encode("utf-8"))
            elif byte_level and all(c in decoder for c in text):
                pieces.append(bytes(decoder[c] for c in text))
            elif (m := _BYTE_TOKEN.match(text)) is not None:
                pieces.append(bytes([int(m.group(1), 16)]))
            else:
                pieces.append(text.replace("▁", " ").encode("utf-8"))
        self.pieces = pieces

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def end_of_turn_ids(self) -> set[int]:
        """The special tokens among the usual end-of-turn markers (<|im_end|>, <|eot_id|>, ...)."""
        ids = (self.token_id(text) for text in _END_OF_TURN)
        return {tid for tid in ids if tid is not None and tid in self.special_ids}

    def piece(self, token: int) -> bytes:
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""

    def tokenize(self, text: str, *, bos: int | None, special: bool) -> list[int]:
        with self._lock:
            previous = self.backend.encode_special_tokens
            self.backend.encode_special_tokens = not special
            try:
                ids = self.backend.encode(text, add_special_tokens=False).ids
            finally:
                self.backend.encode_special_tokens = previous
        return [bos, *ids] if bos is not None else list(ids)

    def detokenize(self, tokens: list[int], *, special: bool) -> str:
        data = b"".join(self.piece(t) for t in tokens if special or t not in self.special_ids)
        return data.decode("utf-8", "replace")


class HFVocabText:
    """The engine contract's token methods over `self.vocab` (an HFVocab) and `self.info` (a mixin for engines)."""

    vocab: HFVocab
    info: ModelInfo

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        bos = self.info.bos_token_id if add_bos and self.info.bos_token_id >= 0 else None
        return self.vocab.tokenize(text, bos=bos, special=special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.vocab.detokenize(tokens, special=special)

    def token_piece(self, token: int) -> bytes:
        return self.vocab.piece(token)
