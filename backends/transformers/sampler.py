"""SamplingParams -> one request's sampling with transformers' logits processors.

transformers' continuous batching applies one processor list to the whole
batch; Parley needs each request's own knobs, so the engine's batch hook
(batching.py) runs a `RowSampler` per request row: token masks (logit_bias,
banned/allowed tokens, ban_eos, min_tokens), transformers' processors
(repetition penalty, temperature, top_k, top_p, min_p, typical) in the order
the request asks, then a draw from the request's own seeded generator.
Knobs transformers has no processor for are in UNSUPPORTED: accepted, logged
once per request, not applied (the README sampler table says so).
"""

from __future__ import annotations

import random

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from backends.sampling import NothingToSample, SamplingParams

UNSUPPORTED: frozenset[str] = frozenset({
    "frequency_penalty", "presence_penalty", "dry_multiplier", "xtc_probability", "mirostat_mode",
    "top_n_sigma", "top_a", "tfs", "smoothing_factor", "min_temp", "max_temp",
})


class RowSampler:
    """One request's sampler: owns its bias row, processors and random generator."""

    __slots__ = ("bias", "eog", "generator", "greedy", "history_window", "params", "processors", "uses_history")

    def __init__(self, params: SamplingParams, *, n_vocab: int, eog: tuple[int, ...], device: torch.device) -> None:
        self.params = params
        self.eog = list(eog)
        bias: torch.Tensor | None = None

        def row() -> torch.Tensor:
            nonlocal bias
            if bias is None:
                bias = torch.zeros(n_vocab, dtype=torch.float32, device=device)
            return bias

        for tok, b in params.logit_bias.items():
            if 0 <= tok < n_vocab:
                row()[tok] += -float("inf") if b <= -100 else b
        banned = [t for t in params.banned_tokens if 0 <= t < n_vocab]
        if params.ban_eos_token:
            banned += self.eog
        if banned:
            row()[banned] = -float("inf")
        if params.allowed_tokens:
            keep = torch.full((n_vocab,), -float("inf"), device=device)
            keep[[t for t in params.allowed_tokens if 0 <= t < n_vocab]] = 0.0
            row().add_(keep)
        self.bias = bias
        self.greedy = params.greedy
        procs = LogitsProcessorList()
        if params.repetition_penalty != 1.0 and params.repetition_penalty > 0:
            procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.uses_history = bool(procs)
        self.history_window = params.penalty_range if params.penalty_range > 0 else None
        if not self.greedy:
            temperature = TemperatureLogitsWarper(params.temperature) if params.temperature != 1.0 else None
            if temperature is not None and not params.temperature_last:
                procs.append(temperature)
            if params.top_k > 1:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.typical < 1.0:
                procs.append(TypicalLogitsWarper(params.typical))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                procs.append(MinPLogitsWarper(params.min_p))
            if temperature is not None and params.temperature_last:
                procs.append(temperature)
        self.processors = procs
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)

    def sample(self, scores: torch.Tensor, history: list[int], n_generated: int) -> int:
        """Pick the next token from one row of raw logits (shape (1, vocab), float32, modified)."""
        if self.bias is not None:
            scores.add_(self.bias)
        if n_generated < self.params.min_tokens and self.eog:
            scores[0, self.eog] = -float("inf")
        if self.processors:
            window = history[-self.history_window:] if self.history_window else history
            ids = torch.tensor([window or [0]], dtype=torch.long, device=scores.device)
            scores = self.processors(ids, scores)
        if not bool(torch.isfinite(scores).any()):
            raise NothingToSample
        if self.greedy:
            return int(torch.argmax(scores, dim=-1).item())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
