"""SamplingParams -> a native llama.cpp sampler chain (C code, one per sequence).

Every knob is mapped here and nowhere else. Knobs llama.cpp has no sampler for
are listed in UNSUPPORTED; the engine logs them once per request and the README
sampler table says so.

A request that only sets a temperature (with or without a logit bias), which
is what OpenAI clients send, or asks for greedy decoding, is sampled by
`DirectSampler` instead: llama.cpp's chain would build a candidate array of the
whole vocabulary and take a scalar exp of each entry, about 0.45 ms a token on
a 49k vocabulary. DirectSampler draws through the compiled kernel of
fastdraw.py when it is built (~0.09 ms, without the GIL), else in vectorized
numpy (~0.26 ms). All draw from the same distribution; seeded requests stay
reproducible on one build.
"""

from __future__ import annotations

import ctypes
import math
import random

import llama_cpp as lc
import numpy as np

from backends.llamacpp.fastdraw import DrawBias, DrawKernel, block_sums
from backends.sampling import NothingToSample, SamplingParams

# Knobs with no native llama.cpp sampler: accepted, logged, not applied.
UNSUPPORTED: frozenset[str] = frozenset({"top_a", "tfs", "smoothing_factor"})

# llama_token_data: (id, logit, p), as the C struct lays it out.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


_BLOCK = 256  # DirectSampler finds a token by cumulative sums over blocks, then within one block
# Peaks (of logits / temperature) for which exp runs on the values as they are, saving one pass:
# no overflow (e^80 * 49k fits a float64 sum), and what underflows weighs under e^-67 of the peak.
_NO_SHIFT_LOW, _NO_SHIFT_HIGH = -20.0, 80.0


class DirectSampler:
    """Softmax(logits / temperature + bias) sampling, or the argmax; for chains with nothing else.

    The draw is exact: exp of every logit (vectorized), a sum per block of 256,
    then cumulative sums over the blocks and inside the chosen block only. With
    a `kernel` (fastdraw.py) that runs in C; without one, in numpy.
    """

    __slots__ = ("_inv_temp", "_bias_ids", "_bias_vals", "_buf", "_blocks", "_rng", "_kernel", "_cbias", "_sums")

    def __init__(self, n_vocab: int, temperature: float, bias: dict[int, float], seed: int,
                 kernel: DrawKernel | None = None) -> None:
        self._inv_temp = 0.0 if temperature <= 0.0 else 1.0 / temperature  # 0: greedy
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        raw_vals = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._kernel = kernel
        if kernel is not None:  # the C draw adds the bias to the logits itself, then scales both
            self._cbias = DrawBias(self._bias_ids, raw_vals, n_vocab)
            self._sums = block_sums(n_vocab)
            return
        # The bias is added before temperature (as llama.cpp's chain does), so it is scaled with the logits.
        scale = self._inv_temp or 1.0
        self._bias_vals = raw_vals * np.float32(scale)
        n_blocks = -(-n_vocab // _BLOCK)
        self._buf = np.zeros(n_blocks * _BLOCK, dtype=np.float32)  # past n_vocab: never written, weight 0
        self._blocks = self._buf.reshape(n_blocks, _BLOCK)

    def sample(self, logits: np.ndarray) -> int:
        if self._kernel is not None:
            u = self._rng.random() if self._inv_temp else 0.0
            token = self._kernel.draw(logits, self._inv_temp, self._cbias, self._sums, u)
            if token < 0:
                raise NothingToSample
            return token
        return self._sample_numpy(logits)

    def _sample_numpy(self, logits: np.ndarray) -> int:
        n = logits.shape[0]
        z = self._buf[:n]
        if not self._inv_temp and not self._bias_ids.size:
            z = logits  # greedy, nothing added: the argmax of the logits as they are
        elif self._inv_temp:
            np.multiply(logits, self._inv_temp, out=z)
        else:
            z[:] = logits
        if self._bias_ids.size:
            z[self._bias_ids] += self._bias_vals
        top = int(z.argmax())
        peak = float(z[top])
        if not math.isfinite(peak):
            raise NothingToSample
        if not self._inv_temp:
            return top
        # exp needs no shift by the peak while it can neither overflow nor lose a token that matters:
        # below the peak's window a token underflows only at a relative weight under e^-67.
        if not _NO_SHIFT_LOW <= peak <= _NO_SHIFT_HIGH:
            np.subtract(z, peak, out=z)
        np.exp(z, out=z)
        sums = np.cumsum(self._blocks.sum(axis=1, dtype=np.float64))
        u = self._rng.random() * sums[-1]
        b = min(int(np.searchsorted(sums, u, side="right")), len(sums) - 1)
        block = self._blocks[b]
        inside = np.cumsum(block, dtype=np.float64)
        j = min(int(np.searchsorted(inside, u - (sums[b - 1] if b else 0.0), side="right")), _BLOCK - 1)
        if block[j] <= 0.0:  # rounding put the draw on a token of weight 0: take the nearest with weight
            live = np.flatnonzero(block)
            if not live.size:
                return top
            j = int(live[min(int(np.searchsorted(live, j)), live.size - 1)])
        return b * _BLOCK + j


class SamplerChain:
    """Owns one llama_sampler chain; free() releases the C memory.

    `direct` is set when the request is plain temperature sampling or greedy:
    then every token is drawn by it and the C chain is never run.
    """

    __slots__ = ("ptr", "seed", "direct", "_keepalive")

    def __init__(self, ptr: int, seed: int, keepalive: list[object], direct: DirectSampler | None = None) -> None:
        self.ptr = ptr
        self.seed = seed
        self.direct = direct
        self._keepalive = keepalive

    def accept(self, token: int) -> None:
        lc.llama_sampler_accept(self.ptr, token)

    def sample(self, ctx: int, idx: int) -> int:
        """Sample from row `idx` of the context's last batch and accept the token."""
        return lc.llama_sampler_sample(self.ptr, ctx, idx)

    def sample_from(self, logits: np.ndarray) -> int:
        """Sample from a logits array held outside the context (as llama_sampler_sample does) and accept."""
        if self.direct is not None:
            return self.direct.sample(logits)
        n = logits.shape[0]
        data = np.empty(n, dtype=_TOKEN_DATA)
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        candidates = lc.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=n, selected=-1, sorted=False
        )
        lc.llama_sampler_apply(self.ptr, ctypes.byref(candidates))
        if not 0 <= candidates.selected < candidates.size:
            raise NothingToSample
        token = int(candidates.data[candidates.selected].id)
        lc.llama_sampler_accept(self.ptr, token)
        return token

    def free(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = 0


def build_chain(
    params: SamplingParams,
    *,
    vocab: int,
    n_vocab: int,
    n_ctx: int,
    eog_tokens: tuple[int, ...],
    extra_bias: dict[int, float] | None = None,
    kernel: DrawKernel | None = None,
) -> SamplerChain:
    """Build the chain in llama.cpp's default order (penalties, DRY, truncation, temperature).

    `kernel`: the compiled draw (fastdraw.load()) for plain temperature and greedy requests, if built."""
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    seed &= 0xFFFFFFFF
    keep: list[object] = []

    def add(sampler: int) -> None:
        lc.llama_sampler_chain_add(chain, sampler)

    bias = dict(params.logit_bias)
    for tok in params.banned_tokens:
        bias[tok] = float("-inf")
    if params.ban_eos_token:
        for tok in eog_tokens:
            bias[tok] = float("-inf")
    if params.allowed_tokens:
        allowed = set(params.allowed_tokens)
        for tok in range(n_vocab):
            if tok not in allowed:
                bias[tok] = float("-inf")
    if extra_bias:
        bias.update(extra_bias)
    cparams = lc.llama_sampler_chain_default_params()
    cparams.no_perf = True
    chain = lc.llama_sampler_chain_init(cparams)
    if _direct_fits(params):  # plain temperature (or greedy) with a fixed bias: numpy draws; the C chain stays empty
        temperature = 0.0 if params.greedy else params.temperature
        return SamplerChain(chain, seed, keep, DirectSampler(n_vocab, temperature, bias, seed, kernel))
    if bias:
        arr = (lc.llama_logit_bias * len(bias))()
        for i, (tok, b) in enumerate(bias.items()):
            arr[i].token = int(tok)
            arr[i].bias = float(b)
        keep.append(arr)
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))

    if (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    ):
        add(
            lc.llama_sampler_init_penalties(
                n_vocab,
                n_ctx if params.penalty_range < 0 else params.penalty_range,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.dry_multiplier > 0.0:
        breakers = [s.encode("utf-8") for s in params.dry_sequence_breakers]
        arr_b = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
        keep.append(arr_b)
        add(
            lc.llama_sampler_init_dry(
                vocab,
                params.dry_multiplier,
                params.dry_base,
                params.dry_allowed_length,
                n_ctx if params.dry_range <= 0 else params.dry_range,  # 0 = whole context
                arr_b,
                len(breakers),
            )
        )

    if params.greedy:
        add(lc.llama_sampler_init_greedy())
        return SamplerChain(chain, seed, keep)

    def add_temperature() -> None:
        if params.dynamic_temperature:
            mid = (params.min_temp + params.max_temp) / 2.0
            delta = (params.max_temp - params.min_temp) / 2.0
            add(lc.llama_sampler_init_temp_ext(mid, delta, params.temp_exponent))
        else:
            add(lc.llama_sampler_init_temp(params.temperature))

    if params.mirostat_mode == 1:
        add_temperature()
        add(lc.llama_sampler_init_mirostat(n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
        return SamplerChain(chain, seed, keep)
    if params.mirostat_mode == 2:
        add_temperature()
        add(lc.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        return SamplerChain(chain, seed, keep)

    if not params.temperature_last:
        add_temperature()
    if params.top_n_sigma > 0.0:
        add(lc.llama_sampler_init_top_n_sigma(params.top_n_sigma))
    if params.top_k > 0:
        add(lc.llama_sampler_init_top_k(params.top_k))
    if params.typical < 1.0:
        add(lc.llama_sampler_init_typical(params.typical, 1))
    if params.top_p < 1.0:
        add(lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(lc.llama_sampler_init_min_p(params.min_p, 1))
    if params.xtc_probability > 0.0:
        add(lc.llama_sampler_init_xtc(params.xtc_probability, params.xtc_threshold, 1, seed))
    if params.temperature_last:
        add_temperature()
    add(lc.llama_sampler_init_dist(seed))
    return SamplerChain(chain, seed, keep)


def _direct_fits(params: SamplingParams) -> bool:
    """True when the chain would be only logit bias, temperature and the draw (or greedy): no state, no cuts."""
    if (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
        or params.dry_multiplier > 0.0
    ):
        return False
    if params.greedy:
        return True
    return (
        params.mirostat_mode == 0
        and not params.dynamic_temperature
        and params.top_n_sigma <= 0.0
        and params.top_k <= 0
        and params.typical >= 1.0
        and params.top_p >= 1.0
        and params.min_p <= 0.0
        and params.xtc_probability <= 0.0
    )
