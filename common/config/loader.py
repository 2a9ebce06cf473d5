"""Parley configuration: models, layered loading and the sample file.

Precedence, lowest first: field defaults < YAML file (`config.yml`, or
`--config PATH`) < environment variables `PARLEY_<SECTION>_<KEY>` < CLI flags
`--<key>`. The layers are merged as plain dicts and validated once by
`ParleyConfig`, so every rule lives in one place. Key names are unique across
sections because flags are named after the bare key. Validation failures
become `ConfigError`s that name the dotted key, the bad value, where it came
from and how to fix it.
The schema (one pydantic model per section) lives in config_schema.py.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError
from ruamel.yaml import YAML, YAMLError

from common.config.schema import (  # ParleyConfig and ModelConfig are imported from here by callers
    ENV_PREFIX,
    ModelConfig,  # noqa: F401
    ParleyConfig,
    env_var_name,
    field_sections,
    section_models,
)
from common.config.cli import (
    COMMANDS,
    UsageError,
    build_parser,
    flag_name,
    is_bool,
    is_list,
    literal_values,
    unwrap_optional,
)

DEFAULT_CONFIG_PATH = "config.yml"


class ConfigError(Exception):
    """Invalid configuration; the message is meant to be shown to the user as is."""


class _Source(NamedTuple):
    """Where a value came from and how the user changes it there."""

    label: str
    fix: str


_Sources = dict[tuple[str, ...], _Source]
_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def _annotation(section: str, key: str) -> Any:
    return section_models()[section].model_fields[key].annotation


def _split(items: list[Any]) -> list[Any]:
    """List items from flags and env may themselves be comma-separated."""
    out: list[Any] = []
    for item in items:
        out += [p.strip() for p in item.split(",") if p.strip()] if isinstance(item, str) else [item]
    return out


def _from_text(value: Any, annotation: Any) -> Any:
    """Turn env/flag strings into what the field expects; pydantic does the rest."""
    if isinstance(value, list):
        return _split(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "" and unwrap_optional(annotation)[1]:
        return None
    if is_bool(annotation) and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if is_list(annotation):
        if text.startswith("["):
            return json.loads(text)
        return _split([text])
    return value


def _read_file(config_path: str | Path | None) -> tuple[Path, dict[str, Any]]:
    path = Path(config_path if config_path is not None else DEFAULT_CONFIG_PATH)
    if not path.exists():
        if config_path is None:
            return path, {}
        raise ConfigError(
            f"Config file {path} does not exist. Check the --config path, or create it with "
            f"'python main.py export-config --output {path}'."
        )
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}") from None
    except YAMLError as exc:
        raise ConfigError(
            f"Config file {path} is not valid YAML:\n{exc}\nFix the syntax: 'key: value', indented with spaces."
        ) from None
    if raw is None:
        return path, {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"Config file {path} must be a mapping of sections (network:, model:, ...), not a {type(raw).__name__}."
        )
    return path, raw


def _merge_file(data: dict[str, Any], sources: _Sources, config_path: str | Path | None) -> None:
    path, raw = _read_file(config_path)
    for section, values in raw.items():
        section = str(section)
        sources[(section,)] = _Source(str(path), f"Fix or remove '{section}:' in {path}.")
        if values is None:  # a section whose keys are all commented out
            continue
        if not isinstance(values, dict) or section not in section_models():
            data[section] = values
            continue
        for key, value in values.items():
            data[section][str(key)] = value
            sources[(section, str(key))] = _Source(str(path), f"Fix '{key}' under '{section}:' in {path}.")


def _merge_env(data: dict[str, Any], sources: _Sources, environ: Mapping[str, str]) -> None:
    known = {env_var_name(s, k): (s, k) for k, s in field_sections().items()}
    prefixes = tuple(f"{ENV_PREFIX}{s}_".upper() for s in section_models())
    unknown = sorted(n for n in environ if n.upper().startswith(prefixes) and n.upper() not in known)
    if unknown:
        hints = "".join(
            f"\n  - {name}" + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(name.upper(), known, 1))
            for name in unknown
        )
        raise ConfigError(
            f"Unknown Parley environment variables:{hints}\n"
            "Rename or unset them; the pattern is PARLEY_<SECTION>_<KEY>, e.g. PARLEY_NETWORK_PORT."
        )
    for name, value in environ.items():
        if name.upper() not in known:
            continue
        section, key = known[name.upper()]
        try:
            data[section][key] = _from_text(value, _annotation(section, key))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{section}.{key}: environment variable {name} is not a valid JSON list ({exc}). "
                'Use JSON such as ["a", "b"] or a comma-separated list such as a,b.'
            ) from None
        sources[(section, key)] = _Source(f"environment variable {name}", f"Fix or unset {name}.")


def _merge_overrides(data: dict[str, Any], sources: _Sources, overrides: Mapping[str, Any]) -> None:
    owners = field_sections()
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in section_models() and isinstance(value, Mapping):
            flat.update(value)  # nested {section: {key: value}} form
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in owners:
            hint = "".join(f" Did you mean {m!r}?" for m in difflib.get_close_matches(key, owners, 1))
            raise ConfigError(f"Unknown config key {key!r} in overrides.{hint}")
        section = owners[key]
        data[section][key] = _from_text(value, _annotation(section, key))
        flag = flag_name(key)
        sources[(section, key)] = _Source(f"flag {flag}", f"Fix the {flag} flag.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: Mapping[str, Any], sources: _Sources) -> str:
    """One line per problem: key, value, source, allowed values and the fix."""
    loc = tuple(str(part) for part in error["loc"])
    dotted = ".".join(loc)
    source = sources.get(loc[:2]) or sources.get(loc[:1])
    where = f" (from {source.label})" if source else ""
    fix = f" {source.fix}" if source else ""
    if error["type"] == "extra_forbidden":
        remove = f" Rename or remove it in {source.label}." if source else ""
        return f"unknown key {dotted}{where}.{_unknown_hint(loc)}{remove}"
    text = f"{dotted}: {error['msg']}, got {_short(error['input'])}{where}."
    if len(loc) >= 2 and loc[0] in section_models() and loc[1] in field_sections():
        allowed = literal_values(_annotation(loc[0], loc[1]))
        if allowed:
            text += f" Allowed values: {', '.join(allowed)}."
    return text + fix


def _unknown_hint(loc: tuple[str, ...]) -> str:
    sections = section_models()
    if len(loc) == 1:
        close = difflib.get_close_matches(loc[0], sections, 1)
        return f" Valid sections: {', '.join(sections)}." + (f" Did you mean {close[0]!r}?" if close else "")
    if len(loc) != 2 or loc[0] not in sections:
        return ""
    owner = field_sections().get(loc[1])
    if owner:
        return f" {loc[1]!r} belongs under '{owner}:', not '{loc[0]}:'."
    close = difflib.get_close_matches(loc[1], sections[loc[0]].model_fields, 1)
    hint = f" Did you mean {loc[0]}.{close[0]}?" if close else ""
    return hint + " 'python main.py export-config' writes every valid key."


def load_config(
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    cli_overrides: Mapping[str, Any] | None = None,
) -> ParleyConfig:
    """Merge defaults < file < env < overrides and validate once.

    `config_path` None reads ./config.yml if it exists; an explicit path must
    exist. `environ` None means `os.environ`. `cli_overrides` maps bare keys
    (or {section: {key: value}}) to values, e.g. {"port": 6000}.
    """
    data: dict[str, Any] = {section: {} for section in section_models()}
    sources: _Sources = {}
    _merge_file(data, sources, config_path)
    _merge_env(data, sources, os.environ if environ is None else environ)
    _merge_overrides(data, sources, cli_overrides or {})
    try:
        return ParleyConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err, sources)}" for err in exc.errors())
        raise ConfigError(f"Invalid configuration:\n{problems}") from None


# ---------------------------------------------------------------- sample file

_HEADER = """\
# Parley sample configuration.
# Generated by `python main.py export-config`; do not edit it by hand.
# config.yml uses the same sections and keys: copy this file to config.yml and
# change what you need (keys you leave out keep their defaults).
# Environment variables PARLEY_<SECTION>_<KEY> (e.g. PARLEY_NETWORK_PORT=6000)
# override the file, and command-line flags (e.g. --port 6000) override both.
"""


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=79 - len(indent) - 2)]


def render_sample_config() -> str:
    """Every section and key with its default, described in comments above it."""
    defaults = ParleyConfig().model_dump(mode="json")
    lines = [_HEADER.rstrip("\n")]
    for section, model in section_models().items():
        lines += ["", *_comment(ParleyConfig.model_fields[section].description or "", ""), f"{section}:"]
        for index, (key, info) in enumerate(model.model_fields.items()):
            if index:
                lines.append("")
            lines += _comment(info.description or "", "  ")
            allowed = literal_values(info.annotation)
            if allowed:
                lines += _comment(f"Allowed values: {', '.join(allowed)}.", "  ")
            # JSON scalars and flow lists are valid YAML (null, true, "text", [..]).
            lines.append(f"  {key}: {json.dumps(defaults[section][key])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


@dataclass
class Invocation:
    """What `main.py` was asked to do, with the validated config."""

    command: str  # "serve" | "export-config" | "export-openapi" | "download"
    config: ParleyConfig
    # export-*: output; download: repo_id, revision, include, exclude, folder_name, token, repo_type
    options: dict[str, Any]


def parse_invocation(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse `main.py [serve|export-config|export-openapi|download] [flags]`.

    `serve` is assumed when no command is given. `export-config` ignores the
    config file and env (it must work even when config.yml is broken) and gets
    the defaults. Raises `ConfigError` for bad flags or values; `--help` exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in (*COMMANDS, "-h", "--help"):
        args.insert(0, "serve")
    try:
        values = vars(build_parser(ParleyConfig).parse_args(args))
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    command = values.pop("command")
    config_path = values.pop("config", None)
    owners = field_sections()
    overrides = {key: values.pop(key) for key in list(values) if key in owners}
    if command == "export-config":
        return Invocation(command, ParleyConfig(), values)
    return Invocation(command, load_config(config_path, environ, overrides), values)
