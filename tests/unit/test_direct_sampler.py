"""The numpy sampler for plain temperature and greedy requests draws from the same distribution as llama.cpp's chain."""

from __future__ import annotations

import numpy as np
import pytest

from backends.llamacpp.sampler import DirectSampler, build_chain
from backends.sampling import SamplingParams

N_VOCAB = 1000  # not a multiple of the block size, so the padding is exercised


def _logits(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.standard_normal(N_VOCAB).astype(np.float32) * 2.0
    out[[3, 500, 999]] += 6.0  # a few likely tokens, one in the padded last block
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _chain(params: SamplingParams):
    return build_chain(params, vocab=None, n_vocab=N_VOCAB, n_ctx=4096, eog_tokens=(0,))


def _histogram(sample, logits: np.ndarray, draws: int) -> np.ndarray:
    counts = np.zeros(N_VOCAB)
    for _ in range(draws):
        counts[sample(logits)] += 1
    return counts / draws


def _bins(probs: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Mass of the 8 likeliest tokens of `by`, one by one, then of ten equal-count groups of the rest."""
    order = np.argsort(-by)
    head = probs[order[:8]]
    tail = [probs[g].sum() for g in np.array_split(order[8:], 10)]
    return np.concatenate([head, tail])


def _agree(freq: np.ndarray, want: np.ndarray, draws: int) -> None:
    """Every bin within 5 standard errors of the expected mass."""
    sigma = np.sqrt(np.maximum(want * (1 - want), 1e-6) / draws)
    assert np.all(np.abs(freq - want) < 5 * sigma + 1e-3), (freq, want)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_the_tempered_softmax(temperature: float) -> None:
    logits = _logits()
    sampler = DirectSampler(N_VOCAB, temperature, {}, seed=1)
    freq = _histogram(sampler.sample, logits, 20000)
    want = _softmax(logits / temperature)
    _agree(_bins(freq, want), _bins(want, want), 20000)


def test_it_matches_the_llama_cpp_chain_it_replaces() -> None:
    logits = _logits(5)
    bias = {3: -1.5, 7: 2.0}
    ours = _chain(SamplingParams(temperature=0.9, logit_bias=bias, seed=11))
    assert ours.direct is not None
    # The same request with a no-op min_p forces the C chain (bias -> temperature -> dist).
    theirs = _chain(SamplingParams(temperature=0.9, logit_bias=bias, seed=11, min_p=1e-9))
    assert theirs.direct is None
    want = _softmax(logits + np.array([bias.get(i, 0.0) for i in range(N_VOCAB)], dtype=np.float32))
    want = _softmax(np.log(want) / 0.9)
    a = _histogram(ours.sample_from, logits, 15000)
    b = _histogram(theirs.sample_from, logits, 15000)
    _agree(_bins(a, want), _bins(want, want), 15000)
    _agree(_bins(b, want), _bins(want, want), 15000)  # the reference chain passes the same test
    ours.free()
    theirs.free()


def test_banned_tokens_are_never_drawn_and_bias_shifts_before_temperature() -> None:
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    sampler = DirectSampler(N_VOCAB, 2.0, {5: float("-inf"), 6: 4.0}, seed=3)
    freq = _histogram(sampler.sample, logits, 5000)
    assert freq[5] == 0.0
    # bias 4 then temperature 2: weight e^2 against 1 for each of the other 998 tokens
    want = np.e**2 / (np.e**2 + N_VOCAB - 2)
    assert abs(freq[6] - want) < 0.01


def test_greedy_is_the_argmax_after_bias() -> None:
    logits = _logits()
    chain = _chain(SamplingParams(temperature=0.0, logit_bias={3: -100.0}))
    assert chain.direct is not None
    want = int(np.argmax(np.where(np.arange(N_VOCAB) == 3, -np.inf, logits)))
    assert chain.sample_from(logits) == want
    chain.free()


def test_a_seed_reproduces_the_draws() -> None:
    logits = _logits()
    one = DirectSampler(N_VOCAB, 1.0, {}, seed=42)
    two = DirectSampler(N_VOCAB, 1.0, {}, seed=42)
    assert [one.sample(logits) for _ in range(50)] == [two.sample(logits) for _ in range(50)]


def test_everything_masked_is_an_error_not_a_token() -> None:
    sampler = DirectSampler(N_VOCAB, 1.0, {}, seed=0)
    with pytest.raises(RuntimeError):
        sampler.sample(np.full(N_VOCAB, -np.inf, dtype=np.float32))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=40),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, min_p=0.05),
        SamplingParams(temperature=0.8, repetition_penalty=1.1),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.8, mirostat_mode=2),
    ],
)
def test_anything_beyond_temperature_and_bias_keeps_the_llama_cpp_chain(params: SamplingParams) -> None:
    chain = _chain(params)
    assert chain.direct is None
    chain.free()


@pytest.mark.parametrize("offset", [-300.0, -25.0, 0.0, 40.0, 300.0])
def test_the_draw_ignores_where_the_logits_sit(offset: float) -> None:
    """Softmax is shift-invariant; the sampler skips its shift by the peak only where exp stays exact."""
    logits = _logits(2) + np.float32(offset)
    sampler = DirectSampler(N_VOCAB, 0.7, {}, seed=4)
    freq = _histogram(sampler.sample, logits, 12000)
    want = _softmax((logits - logits.max()) / 0.7)
    _agree(_bins(freq, want), _bins(want, want), 12000)
    assert DirectSampler(N_VOCAB, 0.0, {}, seed=4).sample(logits) == int(logits.argmax())
