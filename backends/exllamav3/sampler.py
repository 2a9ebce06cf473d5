"""SamplingParams -> an exllamav3 `CustomSampler` (a list of sampling steps), and a constraint `Filter`.

The steps follow exllamav3's own order for its combined sampler: logit bias and
bans, repetition then presence/frequency penalties, then temperature (first or
last), min_p, top_k, top_p, XTC, and the draw. exllamav3 has no step for the
knobs in UNSUPPORTED: accepted, logged, not applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.base import ConstraintState
from backends.sampling import SamplingParams

UNSUPPORTED: frozenset[str] = frozenset({
    "typical", "tfs", "top_a", "top_n_sigma", "smoothing_factor", "min_temp", "max_temp", "mirostat_mode",
    "dry_multiplier",
})

_WHOLE_CONTEXT = int(10e7)  # exllamav3's "no limit" for penalty ranges


def build_sampler(lib: Any, params: SamplingParams, *, eog: tuple[int, ...], n_vocab: int) -> Any:
    steps: list[Any] = []
    bias = {t: (-float("inf") if b <= -100 else b) for t, b in params.logit_bias.items()}
    if params.allowed_tokens:
        allowed = set(params.allowed_tokens)
        bias.update({t: -float("inf") for t in range(n_vocab) if t not in allowed})
    if bias:
        steps.append(lib.SS_LogitBias(bias))
    banned = list(params.banned_tokens) + (list(eog) if params.ban_eos_token else [])
    if banned:
        steps.append(lib.SS_BanTokens(banned))
    window = params.penalty_range if params.penalty_range > 0 else _WHOLE_CONTEXT
    if params.repetition_penalty != 1.0:
        steps.append(lib.SS_RepP(params.repetition_penalty, window, 0))
    if params.presence_penalty or params.frequency_penalty:
        steps.append(lib.SS_PresFreqP(params.presence_penalty, params.frequency_penalty, window, 0))
    if params.greedy:
        steps.append(lib.SS_Argmax())
        return lib.CustomSampler(steps)
    if params.temperature != 1.0 and not params.temperature_last:
        steps.append(lib.SS_Temperature(params.temperature))
    if params.min_p > 0:
        steps.append(lib.SS_MinP(params.min_p))
    if params.top_k > 0:
        steps.append(lib.SS_TopK(params.top_k))
    if params.top_p < 1.0:
        steps.append(lib.SS_TopP(params.top_p))
    if params.xtc_probability > 0:
        steps.append(lib.SS_XTC(params.xtc_probability, params.xtc_threshold))
    if params.temperature != 1.0 and params.temperature_last:
        steps.append(lib.SS_Temperature(params.temperature))
    steps.append(lib.SS_Sample())
    return lib.CustomSampler(steps)


def constraint_filter(lib: Any, tokenizer: Any, state_factory: Any) -> Any:
    """An exllamav3 Filter over Parley's compiled constraint (llguidance), ending the job when it completes."""
    import torch

    class ConstraintFilter(lib.Filter):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__(tokenizer, None, None, True)
            self.state: ConstraintState = state_factory()

        def reset(self) -> None:
            self.state = state_factory()

        def accept_token(self, token: int) -> None:
            self.state.advance(int(token))

        def rollback_tokens(self, num_tokens: int) -> bool:
            self.state.rollback(num_tokens)
            return True

        def is_completed(self) -> bool:
            return self.state.is_finished()

        def get_next_logit_mask(self) -> torch.Tensor:
            width = self.vocab_size or self.state.n_vocab  # type: ignore[attr-defined]
            mask = np.zeros(width, dtype=np.float32)
            self.state.apply_to_logits(mask[: self.state.n_vocab])  # type: ignore[attr-defined]
            if width > self.state.n_vocab:  # type: ignore[attr-defined]
                mask[self.state.n_vocab:] = -np.inf  # type: ignore[attr-defined]
            return torch.from_numpy(mask).half().unsqueeze(0)

        def use_background_worker(self) -> bool:
            return False

    return ConstraintFilter()
