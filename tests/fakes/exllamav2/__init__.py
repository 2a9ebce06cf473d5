"""A fake `exllamav2` for tests on machines without CUDA: the API surface Parley's engine uses.

ExLlamaV2Config/ExLlamaV2/caches/ExLlamaV2Tokenizer/ExLlamaV2Lora here, the
dynamic generator, job and sampler settings in `exllamav2.generator`, with the
job/iterate semantics of tests/fakes/fake_generator.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakes.tokenizer import FakeTokenizer


class ExLlamaV2Config:
    def __init__(self, model_dir: str | None = None) -> None:
        self.model_dir = model_dir
        self.max_seq_len = 512
        self.prepared = False

    def prepare(self, no_tensors: bool = False) -> None:
        assert self.model_dir and (Path(self.model_dir) / "config.json").is_file()
        self.prepared = True


class ExLlamaV2:
    def __init__(self, config: ExLlamaV2Config) -> None:
        assert config.prepared, "call config.prepare() first"
        self.config = config
        self.loaded = False

    def load_autosplit(self, cache: Any, **kwargs: Any) -> None:
        self.loaded = True

    def load(self, **kwargs: Any) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False


class ExLlamaV2CacheBase:
    def __init__(self, model: ExLlamaV2, batch_size: int = 1, max_seq_len: int = -1, copy_from: Any = None,
                 lazy: bool = False, **kwargs: Any) -> None:
        self.model = model
        self.max_seq_len = max_seq_len


class ExLlamaV2Cache(ExLlamaV2CacheBase):
    pass


class ExLlamaV2Cache_Q4(ExLlamaV2CacheBase):  # noqa: N801 - the library's names
    pass


class ExLlamaV2Cache_Q6(ExLlamaV2CacheBase):  # noqa: N801
    pass


class ExLlamaV2Cache_Q8(ExLlamaV2CacheBase):  # noqa: N801
    pass


class ExLlamaV2Tokenizer(FakeTokenizer):
    def __init__(self, config: ExLlamaV2Config, **kwargs: Any) -> None:
        super().__init__(Path(config.model_dir or "."))
        self.config = config


class ExLlamaV2Lora:
    def __init__(self, model: ExLlamaV2, directory: str, lora_scaling: float) -> None:
        self.model = model
        self.directory = directory
        self.lora_scaling = lora_scaling

    @staticmethod
    def from_directory(model: ExLlamaV2, directory: str, lora_scaling: float = 1.0) -> ExLlamaV2Lora:
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"No LoRA found in {directory}")
        return ExLlamaV2Lora(model, directory, lora_scaling)

    def unload(self) -> None:
        pass
