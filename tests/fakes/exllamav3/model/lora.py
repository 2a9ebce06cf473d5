"""Fake exllamav3.model.lora: LoRA.from_directory loads (records) a PEFT folder; unload() removes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

class LoRA:
    def __init__(self, model: Any, directory: str, scaling: float) -> None:
        self.model = model
        self.directory = directory
        self.scaling = scaling

    @staticmethod
    def from_directory(model: Any, directory: str, lora_scaling: float = 1.0) -> LoRA:
        assert (Path(directory) / "adapter_config.json").is_file()
        lora = LoRA(model, directory, lora_scaling)
        model.loras.append(lora)
        return lora

    def unload(self) -> None:
        self.model.loras.remove(self)
