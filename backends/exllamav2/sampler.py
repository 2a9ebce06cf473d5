"""SamplingParams -> `ExLlamaV2Sampler.Settings`, and a constraint filter for exllamav2's dynamic generator.

exllamav2's sampler has a field for nearly every knob; what it lacks is in
UNSUPPORTED (accepted, logged, not applied). Token bans, allowed tokens and
logit_bias go into `token_bias`, as the library's own `disallow_tokens` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.base import ConstraintState
from backends.sampling import SamplingParams

UNSUPPORTED: frozenset[str] = frozenset({"top_n_sigma"})


def build_settings(sampler_cls: Any, params: SamplingParams, *, eog: tuple[int, ...], n_vocab: int) -> Any:
    """`sampler_cls` is `exllamav2.generator.ExLlamaV2Sampler`."""
    import torch

    s = sampler_cls.Settings()
    s.temperature = params.temperature if not params.greedy else 1.0
    s.top_k = 1 if params.greedy else max(params.top_k, 0)
    s.top_p = 0.0 if params.greedy else (params.top_p if params.top_p < 1.0 else 0.0)
    s.min_p = params.min_p
    s.top_a = params.top_a
    s.typical = params.typical if params.typical < 1.0 else 0.0
    s.tfs = params.tfs if params.tfs < 1.0 else 0.0
    s.temperature_last = params.temperature_last
    s.min_temp, s.max_temp, s.temp_exponent = params.min_temp, params.max_temp, params.temp_exponent
    s.smoothing_factor = params.smoothing_factor
    s.token_repetition_penalty = params.repetition_penalty
    s.token_repetition_range = params.penalty_range
    s.token_frequency_penalty = params.frequency_penalty
    s.token_presence_penalty = params.presence_penalty
    s.mirostat = params.mirostat_mode == 2  # exllamav2 implements mirostat v2 only
    s.mirostat_tau, s.mirostat_eta = params.mirostat_tau, params.mirostat_eta
    s.dry_multiplier, s.dry_base = params.dry_multiplier, params.dry_base
    s.dry_allowed_length, s.dry_range = params.dry_allowed_length, params.dry_range
    s.xtc_probability, s.xtc_threshold = params.xtc_probability, params.xtc_threshold
    banned = list(params.banned_tokens) + (list(eog) if params.ban_eos_token else [])
    if params.logit_bias or banned or params.allowed_tokens:
        width = n_vocab + (-n_vocab % 32)
        bias = torch.zeros((width,), dtype=torch.float)
        if params.allowed_tokens:
            bias.fill_(-float("inf"))
            bias[[t for t in params.allowed_tokens if 0 <= t < n_vocab]] = 0.0
        for t, b in params.logit_bias.items():
            if 0 <= t < n_vocab:
                bias[t] += -float("inf") if b <= -100 else b
        if banned:
            bias[[t for t in banned if 0 <= t < n_vocab]] = -float("inf")
        s.token_bias = bias
    return s


def constraint_filter(model: Any, tokenizer: Any, state_factory: Any) -> Any:
    """An ExLlamaV2Filter that masks logits with Parley's compiled constraint (llguidance)."""
    import torch
    from exllamav2.generator.filters import ExLlamaV2Filter

    class ConstraintFilter(ExLlamaV2Filter):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(model, tokenizer)
            self.state: ConstraintState = state_factory()
            self._mask: torch.Tensor | None = None

        def begin(self, prefix_str: str = "") -> None:
            self.state = state_factory()

        def feed(self, token: Any) -> None:
            self.state.advance(int(token))

        def next(self) -> tuple[set[int], set[int]]:
            allowed = self._allowed()
            return set(np.flatnonzero(allowed).tolist()), set()

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            self._mask = torch.from_numpy(~self._allowed())
            return True

        def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
            assert self._mask is not None
            n = min(len(self._mask), logits.shape[-1])
            logits[:n][self._mask[:n].to(logits.device)] = -float("inf")
            logits[n:] = -float("inf")
            return logits

        def _allowed(self) -> np.ndarray:
            width = self.state.n_vocab  # type: ignore[attr-defined]
            probe = np.zeros(width, dtype=np.float32)
            self.state.apply_to_logits(probe)
            return np.isfinite(probe)

    return ConstraintFilter()
