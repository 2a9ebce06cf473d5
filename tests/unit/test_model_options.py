"""What the config asks of the models (common/models/options.py): config -> LoadOptions, draft
options, the manager's settings, and the configured-LoRA policy, with stand-in engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.base import LoadOptions
from common.config.loader import ConfigError, ParleyConfig
from common.errors import BadRequestError, ModelNotFoundError
from common.models.loaded import LoadedModel
from common.models.loras import apply_lora_set, draft_options
from common.models.options import LoraPolicy, ManagerSettings, load_options_from


def config(**sections: dict[str, Any]) -> ParleyConfig:
    return ParleyConfig.model_validate(sections)


class FakeEngine:
    """Records adapter loads and the active set; `broken` adapters fail to load."""

    def __init__(self, broken: tuple[str, ...] = ()) -> None:
        self.broken = broken
        self.loaded: list[tuple[str, Path]] = []
        self.active: list[tuple[str, float]] | None = None

    async def load_lora(self, name: str, path: Path) -> None:
        if name in self.broken:
            raise BadRequestError(f"Adapter '{name}' does not fit this model; convert it for this model.")
        self.loaded.append((name, path))

    def set_loras(self, pairs: list[tuple[str, float]]) -> None:
        self.active = list(pairs)


def model(name: str, engine: FakeEngine) -> LoadedModel:
    return LoadedModel(name, engine, None)  # type: ignore[arg-type]


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    d = tmp_path / "loras"
    d.mkdir()
    (d / "sea.gguf").write_bytes(b"GGUF")
    (d / "sky").mkdir()
    (d / "sky" / "adapter.gguf").write_bytes(b"GGUF")
    return d


@pytest.fixture
def draft_dir(tmp_path: Path) -> Path:
    d = tmp_path / "drafts"
    d.mkdir()
    (d / "tiny.gguf").write_bytes(b"GGUF")
    return d


# -- config -> LoadOptions ------------------------------------------------------------
def test_model_section_maps_onto_load_options() -> None:
    options = load_options_from(config(model={
        "max_seq_len": 4096, "cache_size": 8192, "max_batch_size": 4, "chunk_size": 256, "max_queue": 10,
        "n_threads": 3, "n_gpu_layers": -1, "cache_mode": "Q8_0", "flash_attention": "on",
        "prompt_template": "chatml",
    }))
    assert options == LoadOptions(
        max_seq_len=4096, cache_size=8192, max_batch_size=4, chunk_size=256, max_queue=10, n_threads=3,
        n_gpu_layers=-1, cache_mode="Q8_0", flash_attention="on", prompt_template="chatml",
    )


def test_defaults_are_load_options_defaults() -> None:
    assert load_options_from(config()) == LoadOptions()


def test_ngram_drafting_needs_no_draft_model() -> None:
    options = load_options_from(config(draft_model={"draft_mode": "ngram", "draft_max_tokens": 6}))
    assert (options.draft_mode, options.draft_max_tokens, options.draft_model_path) == ("ngram", 6, None)


def test_draft_model_name_resolves_inside_the_draft_dir(draft_dir: Path) -> None:
    section = {"draft_model_dir": str(draft_dir), "draft_model_name": "tiny.gguf", "draft_mode": "model"}
    options = load_options_from(config(draft_model=section))
    assert (options.draft_mode, options.draft_model_path) == ("model", str(draft_dir / "tiny.gguf"))
    # The name is used only when draft_mode is model (config.yml's documented rule).
    options = load_options_from(config(draft_model=section | {"draft_mode": "none"}))
    assert (options.draft_mode, options.draft_model_path) == ("none", None)


def test_draft_mode_model_without_a_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="draft_model: .*set draft_model_name"):
        load_options_from(config(draft_model={"draft_mode": "model"}))


def test_missing_draft_model_is_a_config_error_listing_what_is_there(draft_dir: Path) -> None:
    with pytest.raises(ConfigError, match="'nope' is not in .*Available: tiny"):
        load_options_from(config(draft_model={"draft_model_dir": str(draft_dir), "draft_model_name": "nope",
                                              "draft_mode": "model"}))


def test_draft_options_of_a_load_request(draft_dir: Path) -> None:
    base = LoadOptions(draft_mode="model", draft_model_path="/base/draft.gguf", draft_max_tokens=8)
    assert draft_options(draft_dir, None, None, None, base) == {
        "draft_mode": "model", "draft_max_tokens": 8, "draft_model_path": "/base/draft.gguf",
    }  # nothing asked: the server's drafter stays
    assert draft_options(draft_dir, None, "tiny", 3, base)["draft_model_path"] == str(draft_dir / "tiny.gguf")
    assert draft_options(draft_dir, "ngram", None, None, base)["draft_model_path"] is None
    with pytest.raises(BadRequestError, match="set draft_model_name"):
        draft_options(draft_dir, "model", None, None, LoadOptions())
    with pytest.raises(ModelNotFoundError):
        draft_options(draft_dir, None, "nope", None, base)
    with pytest.raises(BadRequestError, match="Invalid draft_model name"):
        draft_options(draft_dir, None, "../tiny", None, base)


# -- ManagerSettings ---------------------------------------------------------------------
def test_manager_settings_from_config(tmp_path: Path) -> None:
    settings = ManagerSettings.from_config(config(model={
        "model_dir": str(tmp_path), "backend": "llamacpp", "max_loaded_models": 3, "inline_model_loading": True,
        "inline_model_loading_admin_only": False, "keep_alive": 60, "load_wait_timeout": 2.5,
        "use_dummy_models": True, "dummy_model_names": ["gpt-4o"], "max_seq_len": 512,
    }), Path("/project"))
    assert settings == ManagerSettings(
        model_dir=tmp_path, template_dir=Path("/project/templates"), default_options=LoadOptions(max_seq_len=512),
        preset_dir=Path("/project/sampler_overrides"), backend="llamacpp", dummy_names=("gpt-4o",), max_loaded=3,
        inline_loading=True, inline_admin_only=False, keep_alive=60.0, load_wait_timeout=2.5,
    )


def test_dummy_names_only_when_dummy_models_are_on() -> None:
    settings = ManagerSettings.from_config(config(model={"dummy_model_names": ["gpt-4o"]}), Path("/p"))
    assert settings.dummy_names == ()


# -- configured LoRAs ---------------------------------------------------------------------------
def test_lora_policy_from_config(lora_dir: Path) -> None:
    policy = LoraPolicy.from_config(config(
        model={"model_name": "main.gguf"}, lora={"lora_dir": str(lora_dir), "loras": ["sea:0.5", {"name": "sky"}]},
    ))
    assert policy == LoraPolicy(lora_dir, (("sea", 0.5), ("sky", 1.0)), "main.gguf")
    assert policy.applies_to("main")  # the configured name may carry .gguf
    assert not policy.applies_to("other")
    assert LoraPolicy(lora_dir, (("sea", 1.0),)).applies_to("anything")  # no configured model: any model
    assert not LoraPolicy(lora_dir).applies_to("main")  # no adapters: nothing to do


async def test_lora_policy_loads_onto_the_configured_model_and_skips_a_bad_adapter(lora_dir: Path) -> None:
    policy = LoraPolicy(lora_dir, (("sea", 0.5), ("missing", 1.0), ("sky.gguf", 0.25)), "main")
    engine = FakeEngine()
    await policy.apply(model("main", engine))
    assert engine.loaded == [("sea", lora_dir / "sea.gguf"), ("sky", lora_dir / "sky" / "adapter.gguf")]
    assert engine.active == [("sea", 0.5), ("sky", 0.25)]
    other = FakeEngine()
    await policy.apply(model("other", other))
    assert other.loaded == [] and other.active is None  # another model is left alone


async def test_apply_lora_set_reports_each_failure(lora_dir: Path) -> None:
    engine = FakeEngine(broken=("sky",))
    result = await apply_lora_set(engine, lora_dir, [("sea", 1.0), ("nope", 1.0), ("sky", 0.5), ("../x", 1.0)])
    assert result.active == [("sea", 1.0)] and engine.active == [("sea", 1.0)]
    assert [name for name, _ in result.failed] == ["nope", "sky", "../x"]
    reasons = dict(result.failed)
    assert "Available: sea, sky" in reasons["nope"]
    assert "does not fit" in reasons["sky"]
    assert "no paths" in reasons["../x"]
