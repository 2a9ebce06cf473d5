"""A fake `exllamav3` for tests on machines without CUDA: the API surface Parley's engine uses.

Config/Model/Cache/Tokenizer/Generator/Job/Filter and the sampling steps, with
the generator's job/iterate semantics from tests/fakes/fake_generator.py and
TinyLM standing in for the weights. `Job` keeps exllamav3's constructor; a
`CustomSampler` is honoured for argmax, temperature, bans and logit bias.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from tests.fakes.fake_generator import FakeGeneratorCore, FakeJobState, greedy_or_sample
from tests.fakes.tokenizer import FakeTokenizer

class Config:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    @staticmethod
    def from_directory(directory: str) -> Config:
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(directory)
        return Config(directory)


class Model:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loaded = False
        self.loras: list[Any] = []  # adapters applied to every forward pass

    @staticmethod
    def from_config(config: Config) -> Model:
        return Model(config)

    def load(self, progressbar: bool = False, **kwargs: Any) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False


class CacheLayer_fp16:  # noqa: N801 - the library's name
    pass


class CacheLayer_quant:  # noqa: N801
    pass


class Cache:
    def __init__(self, model: Model, max_num_tokens: int, layer_type: type | None = None, max_batch_size: int = 16,
                 max_history: int = 0, **kwargs: Any) -> None:
        assert max_num_tokens % 256 == 0, "max_num_tokens must be a multiple of 256."
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.layer_type = layer_type or CacheLayer_fp16
        self.kwargs = kwargs


class Tokenizer(FakeTokenizer):
    @staticmethod
    def from_config(config: Config) -> Tokenizer:
        return Tokenizer(Path(config.directory))


# -- sampling steps ----------------------------------------------------------------------------
class SS_Base:  # noqa: N801
    pass


def _step(name: str) -> type:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
    return type(name, (SS_Base,), {"__init__": init})


SS_Argmax = _step("SS_Argmax")
SS_Sample = _step("SS_Sample")
SS_Temperature = _step("SS_Temperature")
SS_MinP = _step("SS_MinP")
SS_TopK = _step("SS_TopK")
SS_TopP = _step("SS_TopP")
SS_RepP = _step("SS_RepP")
SS_PresFreqP = _step("SS_PresFreqP")
SS_BanTokens = _step("SS_BanTokens")
SS_LogitBias = _step("SS_LogitBias")
SS_XTC = _step("SS_XTC")


class CustomSampler:
    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def pick(self, logits: np.ndarray, rng: random.Random) -> int:
        temperature = 1.0
        for st in self.steps:
            if isinstance(st, SS_LogitBias):
                for t, b in st.args[0].items():
                    logits[t] += b
            elif isinstance(st, SS_BanTokens):
                logits[list(st.args[0])] = -np.inf
            elif isinstance(st, SS_Temperature):
                temperature = st.args[0]
            elif isinstance(st, SS_Argmax):
                temperature = 0.0
        return greedy_or_sample(temperature, None, logits, rng)


# -- filters ----------------------------------------------------------------------------------
class Filter:
    def __init__(self, tokenizer: Any, trigger_token: int | None, prefix_str: str | None,
                 eos_after_completed: bool) -> None:
        self.tokenizer = tokenizer
        self.eos_after_completed = eos_after_completed
        self.vocab_size: int | None = None
        self.job = None

    def attach(self, job: Any) -> None:
        self.job = job
        self.vocab_size = 3 + 256

    def feed(self, token: int) -> bool:
        self.accept_token(token)
        return self.is_completed() and self.eos_after_completed

    def rewind(self, num_tokens: int) -> None:
        if not self.rollback_tokens(num_tokens):
            raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def accept_token(self, token: int) -> None:
        raise NotImplementedError

    def rollback_tokens(self, num_tokens: int) -> bool:
        return False

    def get_next_logit_mask(self) -> Any:
        raise NotImplementedError

    def is_completed(self) -> bool:
        raise NotImplementedError


class Job:
    def __init__(self, input_ids: Any, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 max_skips: int | None = 4, sampler: CustomSampler | None = None, seed: int | None = None,
                 stop_conditions: Any = None, decode_special_tokens: bool = False, return_top_tokens: int = 0,
                 return_logits: bool = False, return_probs: bool = False, filters: list[Filter] | None = None,
                 token_healing: bool = False, identifier: object | None = None,
                 banned_strings: list[str] | None = None, **kwargs: Any) -> None:
        assert all(ids.device.type == "cpu" for ids in (input_ids if isinstance(input_ids, list) else [input_ids]))
        self.sampler = sampler or CustomSampler([SS_Argmax()])
        self.state = FakeJobState(input_ids, max_new_tokens or 256, min_new_tokens, seed, stop_conditions,
                                  decode_special_tokens, return_logits, filters, identifier, banned_strings)


class Generator(FakeGeneratorCore):
    def __init__(self, model: Model, cache: Cache, tokenizer: Tokenizer, max_batch_size: int = 256,
                 max_chunk_size: int = 2048, max_q_size: int = 8, draft_model: Model | None = None,
                 draft_cache: Cache | None = None, num_draft_tokens: int | None = None, ngram_match_min: int = 0,
                 **kwargs: Any) -> None:
        assert model.loaded, "load the model before building a generator"
        assert (draft_model is None) == (draft_cache is None), "a draft model needs its own cache"
        self.draft_model = draft_model
        self.ngram_match_min = ngram_match_min
        super().__init__(tokenizer, max_batch_size, lambda job, logits, ctx, rng: job.sampler.pick(logits, rng))

    def begin_filter(self, f: Filter, job: Job) -> None:
        f.attach(job)
        f.reset()

    def mask(self, f: Filter, logits: np.ndarray) -> np.ndarray:
        if f.is_completed():
            return logits
        mask = f.get_next_logit_mask().float().numpy()[0]
        out = np.full_like(logits, -np.inf)
        n = min(len(mask), len(logits))
        out[:n] = logits[:n] + mask[:n]
        return out

    def feed(self, f: Filter, token: int) -> bool:
        return f.feed(token)

    def rewind_filter(self, f: Filter, n: int) -> None:
        f.rewind(n)


class AsyncGenerator:  # present in the library; Parley drives the synchronous Generator
    pass


class AsyncJob:
    pass
