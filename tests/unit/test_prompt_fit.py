"""The early "cannot fit" check of common/models/loaded.py: exact in what it refuses, and free for the
prompts requests normally send (the vocabulary scan would hold the event loop)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.errors import ContextLengthExceededError
from common.generation.prompts import refuse_hopeless
from common.models.loaded import LoadedModel


class Vocabulary:
    """An engine of `n_vocab` tokens whose longest text is `longest` bytes; counts the pieces read."""

    def __init__(self, n_vocab: int, longest: int, n_ctx: int = 100) -> None:
        self.info = SimpleNamespace(n_vocab=n_vocab, n_ctx=n_ctx)
        self.longest = longest
        self.reads = 0

    def token_piece(self, token: int) -> bytes:
        self.reads += 1
        return b"x" * (self.longest if token == 7 else 1)


def test_a_text_no_longer_than_the_budget_never_reads_the_vocabulary() -> None:
    engine = Vocabulary(50, 4)
    model = LoadedModel("m", engine, None)  # type: ignore[arg-type]
    assert model.may_fit(100, 100)
    assert model.may_fit(0, 0)
    refuse_hopeless(model, "a" * 100, "prompt")
    assert engine.reads == 0


def test_a_longer_text_is_judged_by_the_longest_token_read_once() -> None:
    engine = Vocabulary(50, 4)
    model = LoadedModel("m", engine, None)  # type: ignore[arg-type]
    assert model.may_fit(400, 100)  # 100 tokens of 4 bytes could cover it
    assert not model.may_fit(401, 100)
    assert engine.reads == 50
    assert not model.may_fit(10_000, 100)
    assert engine.reads == 50  # read once


def test_refusal_names_the_field_and_the_way_out() -> None:
    model = LoadedModel("m", Vocabulary(50, 4), None)  # type: ignore[arg-type]
    refuse_hopeless(model, "a" * 400, "prompt")  # could still fit: left to the tokenizer
    with pytest.raises(ContextLengthExceededError) as caught:
        refuse_hopeless(model, "a" * 401, "messages")
    assert caught.value.param == "messages"
    assert "max_seq_len" in str(caught.value)
