"""Config layering, validation messages, CLI flags and the sample file."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config.loader import (
    ConfigError,
    ParleyConfig,
    field_sections,
    load_config,
    parse_invocation,
    render_sample_config,
    section_models,
)
from common.config.cli import is_bool

EXPECTED_SECTIONS = [
    "network", "logging", "limits", "model", "draft_model", "lora", "sampling", "embeddings", "store", "vision", "developer", "remote",
]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray ./config.yml must not leak into the tests."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = load_config(environ={})
    assert config == ParleyConfig()
    assert list(ParleyConfig.model_fields) == EXPECTED_SECTIONS
    assert config.network.host == "127.0.0.1"
    assert config.network.port == 5000
    assert config.network.disable_auth is False
    assert config.network.api_servers == ["openai", "kobold", "ollama", "anthropic", "core"]
    assert config.network.cors_origins == []
    assert config.network.max_request_body_bytes == 10_000_000
    assert config.logging.log_level == "INFO"
    assert config.model.model_dir == "models"
    assert config.model.model_name is None
    assert config.model.backend == "auto"
    assert config.model.max_batch_size == 16
    assert config.model.chunk_size == 512
    assert config.model.max_queue == 256
    assert config.model.cache_mode == "FP16"
    assert config.model.dummy_model_names == ["gpt-3.5-turbo"]
    assert config.draft_model.draft_mode == "none"
    assert config.draft_model.draft_max_tokens == 8
    assert config.lora.lora_dir == "loras"
    assert config.lora.loras == []
    assert config.sampling.override_preset is None
    assert config.embeddings.embeddings_device == "cpu"
    assert config.developer.debug_errors is False


def test_defaults_are_not_shared_between_instances() -> None:
    first = ParleyConfig()
    first.network.api_servers.append("core")
    first.model.dummy_model_names.clear()
    assert ParleyConfig().network.api_servers == ["openai", "kobold", "ollama", "anthropic", "core"]
    assert ParleyConfig().model.dummy_model_names == ["gpt-3.5-turbo"]


def test_every_field_has_a_description() -> None:
    for section, model in section_models().items():
        assert ParleyConfig.model_fields[section].description
        for key, info in model.model_fields.items():
            assert info.description, f"{section}.{key} has no description"


def test_field_names_unique_across_sections() -> None:
    keys = [key for model in section_models().values() for key in model.model_fields]
    assert len(keys) == len(set(keys))
    assert field_sections()["model_dir"] == "model"
    assert field_sections()["draft_mode"] == "draft_model"


# ---------------------------------------------------------------- layering


def test_file_env_cli_precedence(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "network:\n  port: 6000\n  host: 0.0.0.0\nmodel:\n  model_name: from-file\n  max_seq_len: 4096\n")
    environ = {"PARLEY_NETWORK_PORT": "7000", "PARLEY_MODEL_MODEL_NAME": "from-env"}

    assert load_config(path, environ={}).network.port == 6000
    config = load_config(path, environ=environ)
    assert (config.network.port, config.model.model_name) == (7000, "from-env")
    assert config.network.host == "0.0.0.0"  # file value survives where env is silent
    assert config.model.max_seq_len == 4096

    config = load_config(path, environ=environ, cli_overrides={"port": "8000"})
    assert (config.network.port, config.model.model_name) == (8000, "from-env")

    invocation = parse_invocation(["--config", str(path), "--model-name", "from-flag"], environ=environ)
    assert invocation.config.model.model_name == "from-flag"
    assert invocation.config.network.port == 7000  # flags not passed do not override


def test_default_config_file_is_read_from_cwd_and_may_be_missing(tmp_path: Path) -> None:
    assert load_config(environ={}) == ParleyConfig()
    write(tmp_path / "config.yml", "logging:\n  log_level: DEBUG\n")
    assert load_config(environ={}).logging.log_level == "DEBUG"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        parse_invocation(["--config", str(tmp_path / "nope.yml")], environ={})


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "a.yml", ""), environ={}) == ParleyConfig()
    assert load_config(write(tmp_path / "b.yml", "network:\nmodel:\n"), environ={}) == ParleyConfig()


def test_invalid_yaml_and_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "a.yml", "network: [\n"), environ={})
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path / "b.yml", "- 1\n- 2\n"), environ={})


def test_env_value_parsing() -> None:
    config = load_config(environ={
        "PARLEY_NETWORK_DISABLE_AUTH": "yes",
        "PARLEY_LOGGING_LOG_PROMPT": "1",
        "PARLEY_DEVELOPER_DEBUG_ERRORS": "False",
        "PARLEY_NETWORK_API_SERVERS": "openai, ollama",
        "PARLEY_NETWORK_CORS_ORIGINS": '["http://a", "http://b"]',
        "PARLEY_MODEL_DUMMY_MODEL_NAMES": "",
        "PARLEY_MODEL_MAX_SEQ_LEN": "2048",
        "PARLEY_DRAFT_MODEL_DRAFT_MODE": "ngram",
        "PARLEY_LORA_LORAS": "style:0.5,other",
    })
    assert config.network.disable_auth is True
    assert config.logging.log_prompt is True
    assert config.developer.debug_errors is False
    assert config.network.api_servers == ["openai", "ollama"]
    assert config.network.cors_origins == ["http://a", "http://b"]
    assert config.model.dummy_model_names == []
    assert config.model.max_seq_len == 2048
    assert config.draft_model.draft_mode == "ngram"
    assert [(lora.name, lora.scaling) for lora in config.lora.loras] == [("style", 0.5), ("other", 1.0)]


def test_empty_env_value_unsets_optional(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "model:\n  model_name: from-file\n")
    assert load_config(path, environ={"PARLEY_MODEL_MODEL_NAME": ""}).model.model_name is None


def test_env_json_loras() -> None:
    config = load_config(environ={"PARLEY_LORA_LORAS": '[{"name": "a", "scaling": 0.25}]'})
    assert config.lora.loras[0].scaling == 0.25
    with pytest.raises(ConfigError, match="PARLEY_LORA_LORAS"):
        load_config(environ={"PARLEY_LORA_LORAS": "[{oops"})


def test_unknown_parley_env_var_is_rejected_with_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PARLEY_NETWORK_PROT": "6000"})
    assert "PARLEY_NETWORK_PROT" in str(info.value)
    assert "PARLEY_NETWORK_PORT" in str(info.value)
    # Variables outside the config sections are left alone.
    assert load_config(environ={"PARLEY_SOMETHING_ELSE": "1", "HOME": "/root"}) == ParleyConfig()


def test_loras_from_file_accept_mappings_and_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "lora:\n  loras:\n    - name: a\n      scaling: 0.5\n    - b:2\n    - c\n")
    loras = load_config(path, environ={}).lora.loras
    assert [(lora.name, lora.scaling) for lora in loras] == [("a", 0.5), ("b", 2.0), ("c", 1.0)]


def test_nested_and_unknown_overrides() -> None:
    config = load_config(environ={}, cli_overrides={"model": {"model_name": "x"}, "port": 6001})
    assert (config.model.model_name, config.network.port) == ("x", 6001)
    with pytest.raises(ConfigError, match="'prot'.*'port'"):
        load_config(environ={}, cli_overrides={"prot": 1})


# ---------------------------------------------------------------- error messages


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "network:\n  prot: 6000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "network.prot" in message
    assert "network.port" in message  # suggestion
    assert str(path) in message


def test_key_in_wrong_section_points_to_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "network:\n  model_dir: /models\n")
    with pytest.raises(ConfigError, match="network.model_dir.*belongs under 'model:'"):
        load_config(path, environ={})


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "modle:\n  model_name: x\n")
    with pytest.raises(ConfigError, match="modle.*Did you mean 'model'"):
        load_config(path, environ={})


def test_invalid_enum_names_key_value_allowed_and_source(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "model:\n  backend: foo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    for part in ("model.backend", "'foo'", "llamacpp", "exllamav3", str(path), "Fix 'backend' under 'model:'"):
        assert part in message


def test_invalid_enum_from_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        parse_invocation(["--backend", "foo"], environ={})
    assert "model.backend" in str(info.value)
    assert "llamacpp" in str(info.value)
    assert "--backend" in str(info.value)


def test_invalid_list_item_names_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"network\.api_servers\.0.*Allowed values: openai, kobold, ollama, anthropic, core"):
        parse_invocation(["--api-servers", "grpc"], environ={})


def test_wrong_typed_port_in_env_names_key_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PARLEY_NETWORK_PORT": "abc"})
    message = str(info.value)
    assert "network.port" in message
    assert "'abc'" in message
    assert "PARLEY_NETWORK_PORT" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"port": 0}, "network.port"),
        ({"port": 70000}, "network.port"),
        ({"max_batch_size": 0}, "model.max_batch_size"),
        ({"chunk_size": 32}, "model.chunk_size"),
        ({"max_seq_len": 8}, "model.max_seq_len"),
        ({"draft_max_tokens": 65}, "draft_model.draft_max_tokens"),
        ({"max_request_body_bytes": 0}, "network.max_request_body_bytes"),
        ({"max_loaded_models": 0}, "model.max_loaded_models"),
        ({"log_level": "TRACE"}, "logging.log_level"),
    ],
)
def test_out_of_range_values_are_rejected(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(environ={}, cli_overrides=overrides)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "network:\n  port: x\nmodel:\n  backend: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "network.port" in str(info.value) and "model.backend" in str(info.value)


# ---------------------------------------------------------------- CLI flags


def test_flag_naming_and_booleans() -> None:
    config = parse_invocation(["--model-dir", "/m", "--disable-auth", "--max-seq-len", "1024"], environ={}).config
    assert (config.model.model_dir, config.network.disable_auth, config.model.max_seq_len) == ("/m", True, 1024)
    config = parse_invocation(["--no-disable-auth"], environ={"PARLEY_NETWORK_DISABLE_AUTH": "true"}).config
    assert config.network.disable_auth is False


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--disable-auth"], True),
        (["--no-disable-auth"], False),
        (["--disable-auth", "true"], True),
        (["--disable-auth", "false"], False),
        (["--disable-auth", "FALSE"], False),
        (["--disable-auth", "Yes"], True),
        (["--disable-auth", "no"], False),
        (["--disable-auth", "1"], True),
        (["--disable-auth", "0"], False),
        (["--disable-auth", "off"], False),
        (["--disable-auth=true"], True),
        (["--disable-auth=No"], False),
        (["--disable-auth", "--port", "6000"], True),
        (["--disable-auth", "false", "--port", "6000"], False),
        (["--port", "6000", "--disable-auth"], True),
        (["--disable-auth", "false", "--disable-auth"], True),  # the last one wins
    ],
)
def test_boolean_flags_take_tabbyapi_true_false_form(argv: list[str], expected: bool) -> None:
    environ = {"PARLEY_NETWORK_DISABLE_AUTH": "true" if not expected else "false"}
    config = parse_invocation(argv, environ=environ).config
    assert config.network.disable_auth is expected


def test_every_boolean_flag_takes_both_forms() -> None:
    for section, model in section_models().items():
        for key, info in model.model_fields.items():
            if not is_bool(info.annotation):
                continue
            flag = "--" + key.replace("_", "-")
            for argv, want in (([flag, "true"], True), ([flag, "False"], False), ([flag], True),
                               (["--no-" + flag[2:]], False)):
                config = parse_invocation(argv, environ={}).config
                assert getattr(getattr(config, section), key) is want, argv


def test_bare_boolean_flag_does_not_swallow_a_positional() -> None:
    invocation = parse_invocation(["download", "--disable-auth", "org/repo"], environ={})
    assert invocation.options["repo_id"] == "org/repo" and invocation.config.network.disable_auth is True
    invocation = parse_invocation(["download", "--disable-auth", "no", "org/repo"], environ={})
    assert invocation.options["repo_id"] == "org/repo" and invocation.config.network.disable_auth is False


def test_bad_boolean_values_say_what_to_write() -> None:
    with pytest.raises(ConfigError, match=r"--disable-auth.*expected true or false.*'maybe'"):
        parse_invocation(["--disable-auth=maybe"], environ={})
    with pytest.raises(ConfigError, match="unrecognized arguments: maybe"):
        parse_invocation(["--disable-auth", "maybe"], environ={})  # not a boolean word: left as an argument
    with pytest.raises(ConfigError, match="--no-disable-auth takes no value.*--disable-auth false"):
        parse_invocation(["--no-disable-auth=false"], environ={})


def test_help_shows_both_boolean_forms(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_invocation(["serve", "--help"], environ={})
    assert "--disable-auth [true|false], --no-disable-auth" in capsys.readouterr().out


def test_list_flags() -> None:
    config = parse_invocation(
        ["--api-servers", "openai", "kobold", "--cors-origins", "--loras", "a:0.5", "b"], environ={}
    ).config
    assert config.network.api_servers == ["openai", "kobold"]
    assert config.network.cors_origins == []
    assert [(lora.name, lora.scaling) for lora in config.lora.loras] == [("a", 0.5), ("b", 1.0)]


def test_unknown_flag_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="--bogus"):
        parse_invocation(["--bogus"], environ={})
    with pytest.raises(ConfigError, match="unrecognized"):
        parse_invocation(["--model"], environ={})  # no prefix matching of --model-dir/--model-name


def test_help_lists_generated_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_invocation(["serve", "--help"], environ={})
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model-dir", "--disable-auth", "--no-disable-auth", "--config", "--loras", "--max-seq-len"):
        assert flag in out
    assert "TCP port to listen on." in out


# ---------------------------------------------------------------- subcommands


def test_serve_is_the_default_command() -> None:
    assert parse_invocation([], environ={}).command == "serve"
    invocation = parse_invocation(["--port", "6000"], environ={})
    assert (invocation.command, invocation.config.network.port, invocation.options) == ("serve", 6000, {})
    assert parse_invocation(["serve", "--port", "6000"], environ={}).config.network.port == 6000


def test_export_config_command(tmp_path: Path) -> None:
    invocation = parse_invocation(["export-config"], environ={})
    assert (invocation.command, invocation.options) == ("export-config", {"output": "config_sample.yml"})
    # Works even when config.yml and env are broken: it only needs the defaults.
    write(tmp_path / "config.yml", "network:\n  port: nope\n")
    invocation = parse_invocation(["export-config", "--output", "x.yml"], environ={"PARLEY_NETWORK_PORT": "bad"})
    assert invocation.options == {"output": "x.yml"}
    assert invocation.config == ParleyConfig()


def test_export_openapi_command_takes_config_flags() -> None:
    invocation = parse_invocation(["export-openapi", "--api-servers", "openai"], environ={})
    assert invocation.command == "export-openapi"
    assert invocation.options == {"output": "openapi.json"}
    assert invocation.config.network.api_servers == ["openai"]
    assert parse_invocation(["export-openapi", "--output", "o.json"], environ={}).options == {"output": "o.json"}


def test_download_command() -> None:
    invocation = parse_invocation(
        ["download", "org/repo", "--revision", "main", "--include", "*.gguf", "*.json", "--exclude", "*f16*",
         "--folder-name", "mine", "--token", "hf_x", "--model-dir", "/data/models", "--repo-type", "dataset",
         "--hf-endpoint", "http://127.0.0.1:8080"],
        environ={},
    )
    assert invocation.command == "download"
    assert invocation.options == {
        "repo_id": "org/repo", "revision": "main", "include": ["*.gguf", "*.json"], "exclude": ["*f16*"],
        "folder_name": "mine", "token": "hf_x", "repo_type": "dataset",
    }
    assert invocation.config.model.model_dir == "/data/models"
    assert invocation.config.model.hf_endpoint == "http://127.0.0.1:8080"

    minimal = parse_invocation(["download", "org/repo"], environ={}).options
    assert minimal == {"repo_id": "org/repo", "revision": None, "include": [], "exclude": [], "folder_name": None,
                       "token": None, "repo_type": "model"}
    with pytest.raises(ConfigError, match="hf_endpoint"):
        parse_invocation(["download", "org/repo", "--hf-endpoint", "huggingface.co"], environ={})
    with pytest.raises(ConfigError, match="REPO_ID"):
        parse_invocation(["download"], environ={})


# ---------------------------------------------------------------- sample file


def test_sample_round_trips_to_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "sample.yml", render_sample_config())
    assert load_config(path, environ={}) == ParleyConfig()


def test_sample_contents() -> None:
    sample = render_sample_config()
    assert "python main.py export-config" in sample.splitlines()[1]
    assert "config.yml" in sample
    for section, model in section_models().items():
        assert f"\n{section}:\n" in sample
        for key in model.model_fields:
            assert f"\n  {key}: " in sample
    assert "  model_name: null\n" in sample
    assert "# TCP port to listen on.\n  port: 5000\n" in sample
    assert "# Allowed values: auto, llamacpp, transformers, exllamav2, exllamav3, remote." in sample
    assert all(len(line) <= 79 for line in sample.splitlines() if line.lstrip().startswith("#"))


def test_edited_sample_overrides_defaults(tmp_path: Path) -> None:
    text = render_sample_config().replace("  port: 5000", "  port: 5123").replace('  backend: "auto"', "  backend: llamacpp")
    config = load_config(write(tmp_path / "c.yml", text), environ={})
    assert (config.network.port, config.model.backend) == (5123, "llamacpp")
