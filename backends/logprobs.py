"""Log-probabilities from a row of logits, for any backend that exposes logits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backends.base import TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=True)
    x -= x.max()
    np.exp(x, out=x)
    total = float(x.sum())
    out = logits.astype(np.float32, copy=True)
    out -= logits.max() + np.log(total)
    return out


def token_logprob(
    logprobs: np.ndarray, token: int, top_n: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """The chosen token's log-probability and the top_n alternatives."""
    top: list[tuple[str, int, float]] = []
    if top_n > 0:
        idx = np.argpartition(-logprobs, top_n)[:top_n]
        idx = idx[np.argsort(-logprobs[idx])]
        top = [(piece(int(t)).decode("utf-8", "replace"), int(t), float(logprobs[t])) for t in idx]
    raw = piece(token)
    return TokenLogprob(raw.decode("utf-8", "replace"), token, float(logprobs[token]), list(raw), top)
