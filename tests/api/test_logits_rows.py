"""NativeModel.logits_row: cached views of the last batch's logits read what llama.cpp wrote, decode after decode."""

from __future__ import annotations

from pathlib import Path

import llama_cpp as lc
import numpy as np
import pytest

from backends.base import LoadOptions
from backends.llamacpp.native import NativeBatch, NativeModel

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fresh(model: NativeModel, idx: int) -> np.ndarray:
    return np.ctypeslib.as_array(lc.llama_get_logits_ith(model.ctx, idx), shape=(model.n_vocab,)).copy()


def test_rows_are_views_of_the_current_batch() -> None:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL.name} is not in models/")
    model = NativeModel(MODEL, LoadOptions(max_seq_len=256, max_batch_size=2, n_threads=2))
    try:
        batch = NativeBatch(model.n_batch)
        first = model.tokenize("The capital of France is", add_bos=True, special=False)
        second = model.tokenize("Once upon a time", add_bos=True, special=False)
        batch.add(first, 0, 0, True)
        end = batch.add(second, 0, 1, True)
        assert lc.llama_decode(model.ctx, batch.finalize()) == 0
        rows = {len(first) - 1: model.logits_row(len(first) - 1), end: model.logits_row(end)}
        for idx, row in rows.items():
            assert row.shape == (model.n_vocab,) and row.dtype == np.float32
            np.testing.assert_array_equal(row, _fresh(model, idx))
            assert model.logits_row(idx) is row  # the same view, not a new wrapping
        assert not np.array_equal(rows[len(first) - 1], rows[end])  # two prompts, two rows
        before = rows[end].copy()
        # The next decode writes new logits where the cached views point.
        batch.clear()
        batch.add([int(before.argmax())], len(second), 1, True)
        assert lc.llama_decode(model.ctx, batch.finalize()) == 0
        now = model.logits_row(0)
        np.testing.assert_array_equal(now, _fresh(model, 0))
        assert not np.array_equal(now, before)
    finally:
        model.free()
