"""Remote models from config.yml and NAME.remote.yml files: what is read, and what stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config.loader import ConfigError, load_config
from common.models.remote import remote_specs


def _config(tmp: Path, models: list[dict[str, object]]) -> object:
    (tmp / "models").mkdir(parents=True, exist_ok=True)
    (tmp / "config.yml").touch()
    return load_config(config_path=tmp / "config.yml", environ={},
                       cli_overrides={"model": {"model_dir": str(tmp / "models")}, "remote": {"remote_models": models}})


def test_config_entries_and_model_directory_files(tmp_path: Path) -> None:
    config = _config(tmp_path, [{"name": "big", "kind": "openai", "replicas": ["http://h1:8000/", "http://h2:8000"],
                                 "upstream_model": "org/Big", "api_key_env": "BIG_KEY", "routing": "prefix_affinity"}])
    (tmp_path / "models" / "local-ollama.remote.yml").write_text("kind: ollama\nreplicas: [http://127.0.0.1:11434]\n")
    specs = remote_specs(config, {"BIG_KEY": "s3cret"})  # type: ignore[arg-type]
    big, olla = specs
    assert (big.name, big.api_key, big.replicas, big.routing) == ("big", "s3cret", ("http://h1:8000", "http://h2:8000"),
                                                                  "prefix_affinity")
    assert (olla.name, olla.kind, olla.upstream_model, olla.health_path) == ("local-ollama", "ollama", "local-ollama",
                                                                             "/api/version")


def test_errors_name_the_key_or_the_file(tmp_path: Path) -> None:
    config = _config(tmp_path, [{"name": "a", "kind": "openai", "replicas": ["http://h:1"], "api_key_env": "NOPE"}])
    with pytest.raises(ConfigError, match=r"remote\.remote_models\[0\]\.api_key_env: the environment variable NOPE"):
        remote_specs(config, {})  # type: ignore[arg-type]
    (tmp_path / "models" / "a.remote.yml").write_text("kind: openai\nreplicas: [http://h:2]\n")
    with pytest.raises(ConfigError, match=r"a\.remote\.yml\.name: 'a' is already declared by remote\.remote_models\[0\]"):
        remote_specs(config, {"NOPE": "k"})  # type: ignore[arg-type]
    (tmp_path / "models" / "a.remote.yml").write_text("kind: grpc\nreplicas: [http://h:2]\n")
    with pytest.raises(ConfigError, match=r"a\.remote\.yml: kind"):
        remote_specs(config, {"NOPE": "k"})  # type: ignore[arg-type]
    config = _config(tmp_path / "x", [{"name": "b", "kind": "openai", "replicas": ["h:1"]}])
    with pytest.raises(ConfigError, match=r"remote\.remote_models\[0\]\.replicas\[0\]"):
        remote_specs(config, {})  # type: ignore[arg-type]
