"""What the server config asks of the models: default load options, manager settings, configured LoRAs.

`load_options_from` maps config.yml's `model` and `draft_model` sections onto
LoadOptions (the server-wide defaults that a model's parley.yml and a load
request refine); `ManagerSettings` is the rest of what the ModelManager reads
from the config; `LoraPolicy` is `lora.loras`, the adapters loaded onto the
configured model each time it loads. This is the one place in common/models
that reads ParleyConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from loguru import logger

from backends.base import LoadOptions
from common.config.loader import ConfigError, ParleyConfig
from common.errors import APIError
from common.models.files import strip_gguf
from common.models.loaded import LoadedModel
from common.models.loras import apply_lora_set, draft_options


def load_options_from(config: ParleyConfig) -> LoadOptions:
    """The server's default load options; raises ConfigError when the draft model setting cannot be used."""
    m, d = config.model, config.draft_model
    options = LoadOptions(
        max_seq_len=m.max_seq_len,
        cache_size=m.cache_size,
        max_batch_size=m.max_batch_size,
        chunk_size=m.chunk_size,
        max_queue=m.max_queue,
        n_threads=m.n_threads,
        n_gpu_layers=m.n_gpu_layers,
        cache_mode=m.cache_mode,
        flash_attention=m.flash_attention,
        prompt_template=m.prompt_template,
        draft_mode=d.draft_mode,
        draft_max_tokens=d.draft_max_tokens,
        draft_adaptive=d.draft_adaptive,
        device=None if config.embeddings.embeddings_device == "cpu" else config.embeddings.embeddings_device,
        mmproj=m.mmproj,
    )
    if d.draft_mode == "model" or d.draft_model_name:
        try:
            resolved = draft_options(Path(d.draft_model_dir), d.draft_mode, d.draft_model_name, None, options)
        except APIError as exc:
            raise ConfigError(f"draft_model: {exc.message}") from None
        options = replace(options, **resolved)
    return options


@dataclass(frozen=True)
class ManagerSettings:
    """Everything the ModelManager takes from the config, typed (see config.yml's `model` section)."""

    model_dir: Path
    template_dir: Path
    default_options: LoadOptions = field(default_factory=LoadOptions)
    preset_dir: Path | None = None  # sampler_overrides/, for `sampling_preset` in a model's parley.yml
    backend: str = "auto"
    dummy_names: tuple[str, ...] = ()  # names that mean the default model
    max_loaded: int = 1
    inline_loading: bool = False  # a request naming an unloaded model loads it
    inline_admin_only: bool = True  # ...only with the admin key
    keep_alive: float | None = None  # idle seconds before a model unloads; None: never
    load_wait_timeout: float = 30.0  # how long a load waits for a loaded model to go idle
    embedding_model_dir: Path | None = None  # a second folder of (embedding) models, listed with model_dir's
    max_loaded_embedding: int = 2  # embedding models loaded at once, apart from max_loaded

    @classmethod
    def from_config(cls, config: ParleyConfig, project_root: Path) -> ManagerSettings:
        """The settings a ParleyConfig describes; templates and presets come from the project's folders.
        Raises ConfigError when the draft model setting cannot be used."""
        m = config.model
        return cls(
            model_dir=Path(m.model_dir),
            template_dir=project_root / "templates",
            default_options=load_options_from(config),
            preset_dir=project_root / "sampler_overrides",
            backend=m.backend,
            dummy_names=tuple(m.dummy_model_names) if m.use_dummy_models else (),
            max_loaded=m.max_loaded_models,
            inline_loading=m.inline_model_loading,
            inline_admin_only=m.inline_model_loading_admin_only,
            keep_alive=m.keep_alive,
            load_wait_timeout=m.load_wait_timeout,
            embedding_model_dir=Path(config.embeddings.embedding_model_dir) if config.embeddings.embedding_model_dir
            else None,
            max_loaded_embedding=config.embeddings.max_loaded_embedding_models,
        )


@dataclass(frozen=True)
class LoraPolicy:
    """`lora.loras`: adapters loaded onto the configured model (any model when none is configured) each
    time it loads, reloads included, and made its active set. Pass `apply` as the manager's `prepare`."""

    lora_dir: Path
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scaling)
    model_name: str | None = None

    @classmethod
    def from_config(cls, config: ParleyConfig) -> LoraPolicy:
        return cls(
            Path(config.lora.lora_dir),
            tuple((entry.name, entry.scaling) for entry in config.lora.loras),
            config.model.model_name or None,
        )

    def applies_to(self, model_name: str) -> bool:
        return bool(self.loras) and (self.model_name is None or strip_gguf(self.model_name) == model_name)

    async def apply(self, model: LoadedModel) -> None:
        """Load the adapters onto a newly loaded model; one that fails is logged and left out."""
        if not self.applies_to(model.name):
            return
        result = await apply_lora_set(model.engine, self.lora_dir, self.loras)
        for name, why in result.failed:
            logger.error("LoRA '{}' (lora.loras) was not loaded: {}", name, why)
        active = ", ".join(f"{n}@{s:g}" for n, s in result.active) or "none"
        logger.info("LoRA adapters active on {}: {}", model.name, active)
