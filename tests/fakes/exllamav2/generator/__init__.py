"""Fake exllamav2.generator: ExLlamaV2DynamicGenerator / ExLlamaV2DynamicJob / ExLlamaV2Sampler."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.fakes.fake_generator import FakeGeneratorCore, FakeJobState, greedy_or_sample


class ExLlamaV2Sampler:
    @dataclass
    class Settings:
        token_repetition_penalty: float = 1.025
        token_repetition_range: int = -1
        token_frequency_penalty: float = 0.0
        token_presence_penalty: float = 0.0
        temperature: float = 0.8
        smoothing_factor: float = 0.0
        min_temp: float = 0
        max_temp: float = 0.0
        temp_exponent: float = 1.0
        top_k: int = 50
        top_p: float = 0.8
        top_a: float = 0.0
        min_p: float = 0
        tfs: float = 0
        typical: float = 0
        temperature_last: bool = False
        mirostat: bool = False
        mirostat_tau: float = 1.5
        mirostat_eta: float = 0.1
        token_bias: Any = None
        dry_allowed_length: int = 2
        dry_base: float = 1.75
        dry_multiplier: float = 0.0
        dry_range: int = 0
        xtc_probability: float = 0.0
        xtc_threshold: float = 0.1

        def pick(self, logits: np.ndarray, rng: random.Random) -> int:
            if self.token_bias is not None:
                logits = logits + self.token_bias.numpy()[: len(logits)]
            greedy = self.top_k == 1 or self.temperature <= 0
            return greedy_or_sample(0.0 if greedy else self.temperature, None, logits, rng)


class ExLlamaV2DynamicJob:
    def __init__(self, input_ids: Any, max_new_tokens: int, min_new_tokens: int = 0, max_skips: int | None = 4,
                 gen_settings: ExLlamaV2Sampler.Settings | None = None, seed: int | None = None,
                 stop_conditions: Any = None, decode_special_tokens: bool = False, return_top_tokens: int = 0,
                 return_logits: bool = False, return_probs: bool = False, filters: Any = None,
                 filter_prefer_eos: bool = False, token_healing: bool = False, identifier: object | None = None,
                 banned_strings: list[str] | None = None, **kwargs: Any) -> None:
        self.gen_settings = gen_settings or ExLlamaV2Sampler.Settings()
        self.state = FakeJobState(input_ids, max_new_tokens, min_new_tokens, seed, stop_conditions,
                                  decode_special_tokens, return_logits, filters, identifier, banned_strings)


class ExLlamaV2DynamicGenerator(FakeGeneratorCore):
    def __init__(self, model: Any, cache: Any, tokenizer: Any, max_batch_size: int | None = None,
                 max_seq_len: int | None = None, max_chunk_size: int | None = None, max_q_size: int = 8,
                 draft_model: Any = None, draft_cache: Any = None, num_draft_tokens: int = 4,
                 use_ngram_draft: bool = False, max_ngram: int = 4, paged: bool = True, **kwargs: Any) -> None:
        assert model.loaded, "load the model before building a generator"
        self.current_loras: list[Any] = []
        super().__init__(tokenizer, max_batch_size or 16,
                         lambda job, logits, ctx, rng: job.gen_settings.pick(logits, rng))

    def set_loras(self, loras: Any) -> None:
        assert not self.num_remaining_jobs(), "LoRAs cannot be updated while there are jobs in the generator queue."
        self.current_loras = [] if loras is None else (loras if isinstance(loras, list) else [loras])

    def begin_filter(self, f: Any, job: Any) -> None:
        f.begin("")

    def mask(self, f: Any, logits: np.ndarray) -> np.ndarray:
        import torch

        if f.can_mask_logits():
            assert f.prepare_logit_mask()
            return f.mask_logits(torch.from_numpy(logits.copy())).numpy()
        allowed, _ = f.next()
        out = np.full_like(logits, -np.inf)
        idx = sorted(allowed)
        out[idx] = logits[idx]
        return out

    def feed(self, f: Any, token: int) -> bool:
        f.feed(token)
        return False

    def rewind_filter(self, f: Any, n: int) -> None:
        raise NotImplementedError("the fake exllamav2 does not rewind filters")
