"""The sampler for plain temperature and greedy requests, numpy and compiled (fastdraw.c), draws from the same
distribution as llama.cpp's chain it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from backends.llamacpp import fastdraw
from backends.llamacpp.sampler import DirectSampler, build_chain
from backends.sampling import SamplingParams

N_VOCAB = 1000  # not a multiple of the block size, so the padding is exercised


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> fastdraw.DrawKernel:
    """The C draw, built from the source in this tree into a temporary folder."""
    try:
        path = fastdraw.build(tmp_path_factory.mktemp("fastdraw") / "libparley_draw.so")
    except fastdraw.BuildError as exc:
        pytest.skip(f"no compiled draw on this machine: {exc}")
    kernel = fastdraw.load(path)
    assert kernel is not None, "the compiled draw failed its self-check"
    return kernel


@pytest.fixture(params=["numpy", "compiled"])
def kernel(request: pytest.FixtureRequest) -> fastdraw.DrawKernel | None:
    return None if request.param == "numpy" else request.getfixturevalue("compiled")


def _logits(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.standard_normal(N_VOCAB).astype(np.float32) * 2.0
    out[[3, 500, 999]] += 6.0  # a few likely tokens, one in the padded last block
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _chain(params: SamplingParams, kernel: fastdraw.DrawKernel | None = None):
    return build_chain(params, vocab=None, n_vocab=N_VOCAB, n_ctx=4096, eog_tokens=(0,), kernel=kernel)


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
def test_draws_follow_the_tempered_softmax(temperature: float, kernel) -> None:
    logits = _logits()
    sampler = DirectSampler(N_VOCAB, temperature, {}, seed=1, kernel=kernel)
    freq = _histogram(sampler.sample, logits, 20000)
    want = _softmax(logits / temperature)
    _agree(_bins(freq, want), _bins(want, want), 20000)


def test_it_matches_the_llama_cpp_chain_it_replaces(kernel) -> None:
    logits = _logits(5)
    bias = {3: -1.5, 7: 2.0}
    ours = _chain(SamplingParams(temperature=0.9, logit_bias=bias, seed=11), kernel)
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
    assert np.array_equal(logits, _logits(5))  # the bias was taken off the caller's row again
    ours.free()
    theirs.free()


def test_banned_tokens_are_never_drawn_and_bias_shifts_before_temperature(kernel) -> None:
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    sampler = DirectSampler(N_VOCAB, 2.0, {5: float("-inf"), 6: 4.0}, seed=3, kernel=kernel)
    freq = _histogram(sampler.sample, logits, 5000)
    assert freq[5] == 0.0
    # bias 4 then temperature 2: weight e^2 against 1 for each of the other 998 tokens
    want = np.e**2 / (np.e**2 + N_VOCAB - 2)
    assert abs(freq[6] - want) < 0.01


def test_greedy_is_the_argmax_after_bias(kernel) -> None:
    logits = _logits()
    chain = _chain(SamplingParams(temperature=0.0, logit_bias={3: -100.0}), kernel)
    assert chain.direct is not None
    want = int(np.argmax(np.where(np.arange(N_VOCAB) == 3, -np.inf, logits)))
    assert chain.sample_from(logits) == want
    chain.free()


def test_a_seed_reproduces_the_draws(kernel) -> None:
    logits = _logits()
    one = DirectSampler(N_VOCAB, 1.0, {}, seed=42, kernel=kernel)
    two = DirectSampler(N_VOCAB, 1.0, {}, seed=42, kernel=kernel)
    assert [one.sample(logits) for _ in range(50)] == [two.sample(logits) for _ in range(50)]


def test_everything_masked_is_an_error_not_a_token(kernel) -> None:
    sampler = DirectSampler(N_VOCAB, 1.0, {}, seed=0, kernel=kernel)
    with pytest.raises(RuntimeError):
        sampler.sample(np.full(N_VOCAB, -np.inf, dtype=np.float32))
    banned_all = DirectSampler(N_VOCAB, 0.0, {t: float("-inf") for t in range(N_VOCAB)}, seed=0, kernel=kernel)
    with pytest.raises(RuntimeError):
        banned_all.sample(_logits())


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
def test_the_draw_ignores_where_the_logits_sit(offset: float, kernel) -> None:
    """Softmax is shift-invariant; the sampler skips its shift by the peak only where exp stays exact."""
    logits = _logits(2) + np.float32(offset)
    sampler = DirectSampler(N_VOCAB, 0.7, {}, seed=4, kernel=kernel)
    freq = _histogram(sampler.sample, logits, 12000)
    want = _softmax((logits - logits.max()) / 0.7)
    _agree(_bins(freq, want), _bins(want, want), 12000)
    assert DirectSampler(N_VOCAB, 0.0, {}, seed=4, kernel=kernel).sample(logits) == int(logits.argmax())


def test_the_compiled_draw_picks_the_token_whose_mass_holds_the_uniform(compiled: fastdraw.DrawKernel) -> None:
    """For a given uniform u the draw is the token where the cumulative softmax passes u (the inverse CDF),
    checked against float64 numpy wherever u is not within rounding of a boundary; and ties in greedy go to
    the first token, as numpy's argmax does."""
    logits = _logits(9)
    n = logits.size
    none = fastdraw.DrawBias(np.empty(0, np.int64), np.empty(0, np.float32), n)
    sums = fastdraw.block_sums(n)
    for temperature in (0.6, 1.0, 1.9):
        w = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
        cdf = np.cumsum(w) / w.sum()
        for u in np.random.default_rng(3).random(300):
            if np.min(np.abs(cdf - u)) < 1e-5:
                continue
            assert compiled.draw(logits, 1.0 / temperature, none, sums, float(u)) == int(np.searchsorted(cdf, u, "right"))
    tied = np.zeros(n, dtype=np.float32)
    tied[[40, 41, 900]] = 5.0
    assert compiled.draw(tied, 0.0, none, sums, 0.0) == 40


def test_a_stale_or_broken_library_is_not_used(tmp_path) -> None:
    assert fastdraw.load(tmp_path / "missing.so") is None
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    assert fastdraw.load(junk) is None
    assert fastdraw.library_path().name.startswith("libparley_draw-")  # named by its source's hash
