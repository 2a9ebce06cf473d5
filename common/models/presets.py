"""Sampler presets: `sampler_overrides/<name>.yml`, TabbyAPI style.

A preset maps `SamplingParams` field names to an entry:

    temperature:
      override: 0.7      # the preset's value
      force: false       # true: the value wins even when the request set the field
      additive: false    # lists only: the request's list plus the preset's
    stop: ["\\n\\nUser:"]  # shorthand for {override: [...]}

Without `force`, a preset only fills in the fields a request did not send.
`additive` lists combine in either case (the request's items first, then
the preset's items it does not already have).

API:
- `list_presets(directory) -> list[str]`: preset names (file stems), sorted.
- `load_preset(directory, name) -> Preset`: the name is a bare file name in
  `directory` (".yml"/".yaml" optional); anything path-like raises
  ValueError, an unknown name FileNotFoundError listing the available ones,
  an unknown field or a bad value PresetError naming the field and the file.
- `apply_preset(preset, sent) -> dict`: pure. `sent` holds the fields the
  client actually sent (canonical SamplingParams names; None counts as not
  sent); the result is the merged dict to build SamplingParams from.
- `Preset.describe()` gives the `{field: {override, force, additive}}`
  shape for GET /v1/sampling/overrides.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ruamel.yaml import YAML, YAMLError

from common.errors import APIError
from backends.sampling import SamplingParams

PRESET_SUFFIXES = (".yml", ".yaml")
_ENTRY_KEYS = frozenset({"override", "force", "additive"})


class PresetError(ValueError):
    """A preset file is malformed: unknown field, bad value or bad entry."""


@dataclass(frozen=True)
class PresetEntry:
    value: Any
    force: bool = False
    additive: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    entries: Mapping[str, PresetEntry] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_mapping(cls, name: str, data: Any, source: str = "preset") -> Preset:
        """Validate a parsed YAML mapping into a Preset (PresetError naming field and source)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PresetError(f"{source}: a preset must map SamplingParams field names to entries.")
        hints = _field_types()
        entries: dict[str, PresetEntry] = {}
        for key, raw in data.items():
            if key not in hints:
                known = ", ".join(sorted(hints))
                raise PresetError(f"{source}: unknown sampler field '{key}'. Known fields: {known}.")
            entries[key] = _entry(str(key), raw, hints[key], source)
        return cls(name, types.MappingProxyType(entries), None)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "override": list(e.value) if isinstance(e.value, tuple) else e.value,
                "force": e.force,
                "additive": e.additive,
            }
            for name, e in self.entries.items()
        }


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(SamplingParams)


def _entry(name: str, raw: Any, hint: Any, source: str) -> PresetEntry:
    where = f"{source}: field '{name}'"
    if isinstance(raw, Mapping) and "override" in raw:
        extra = set(raw) - _ENTRY_KEYS
        if extra:
            raise PresetError(f"{where} has unknown keys {sorted(extra)}; use override, force, additive.")
        force, additive = raw.get("force", False), raw.get("additive", False)
        if not isinstance(force, bool) or not isinstance(additive, bool):
            raise PresetError(f"{where}: 'force' and 'additive' must be true or false.")
        value = raw["override"]
    else:
        force, additive, value = False, False, raw
    value = _coerce(value, hint, where)
    if additive and not isinstance(value, tuple):
        raise PresetError(f"{where}: 'additive' applies only to list fields.")
    try:
        SamplingParams(**{name: value})
    except (APIError, TypeError, ValueError) as exc:
        raise PresetError(f"{where}: {getattr(exc, 'message', exc)}") from None
    return PresetEntry(value, force, additive)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the field's type; lists become tuples."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PresetError(f"{where} must be a list.")
        return tuple(_coerce(v, args[0], where + " item") for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise PresetError(f"{where} must be a mapping.")
        try:
            return {int(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise PresetError(f"{where} must map token ids to numbers.") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise PresetError(f"{where} must be true or false.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PresetError(f"{where} must be an integer.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PresetError(f"{where} must be a number.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PresetError(f"{where} must be a string.")
        return value
    return value


def list_presets(directory: Path | str) -> list[str]:
    """Names of the presets in `directory`, sorted, without extension."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        {p.stem for p in directory.iterdir() if p.suffix in PRESET_SUFFIXES and p.stem and p.is_file()}
    )


def resolve_preset(directory: Path | str, name: str) -> Path:
    """The file of preset `name` inside `directory`, never outside it."""
    directory = Path(directory)
    for suffix in PRESET_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if (
        not name.strip()
        or any(sep in name for sep in ("/", "\\", "\x00"))
        or ".." in name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ValueError(
            f"Invalid sampler preset name {name!r}: give the bare name of a preset in {directory} "
            "(for example 'precise'), not a path."
        )
    for suffix in PRESET_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.is_file():
            return path
    available = ", ".join(list_presets(directory)) or "none"
    raise FileNotFoundError(
        f"Sampler preset '{name}' was not found in {directory}. Available presets: {available}."
    )


def load_preset(directory: Path | str, name: str) -> Preset:
    path = resolve_preset(directory, name)
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    preset = Preset.from_mapping(path.stem, data, str(path))
    return dataclasses.replace(preset, path=path)


def apply_preset(preset: Preset | None, sent: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a preset into the fields a request sent; returns a new dict."""
    merged = {k: v for k, v in sent.items() if v is not None}
    if preset is None:
        return merged
    for name, entry in preset.entries.items():
        if name not in merged:
            merged[name] = entry.value
        elif entry.additive:
            ours = tuple(merged[name]) if isinstance(merged[name], (list, tuple)) else (merged[name],)
            merged[name] = ours + tuple(v for v in entry.value if v not in ours)
        elif entry.force:
            merged[name] = entry.value
    return merged


def build_params(
    sent: Mapping[str, Any],
    preset: Preset | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """The one way a dialect turns its request into SamplingParams.

    Precedence: dialect defaults < preset < what the client sent < forced preset fields.
    """
    merged = apply_preset(preset, sent)
    for key, value in (defaults or {}).items():
        merged.setdefault(key, value)
    return SamplingParams(**merged)


@dataclass
class PresetState:
    """The server's active sampler preset (lives on app.state, switched at runtime)."""

    directory: Path
    active: Preset | None = None

    def switch(self, name: str) -> Preset:
        from common.errors import BadRequestError

        try:
            self.active = load_preset(self.directory, name)
        except (FileNotFoundError, ValueError) as exc:
            raise BadRequestError(str(exc), param="preset") from None
        return self.active

    def use_inline(self, overrides: Mapping[str, Any]) -> Preset:
        from common.errors import BadRequestError

        try:
            self.active = Preset.from_mapping("inline", dict(overrides), "request overrides")
        except PresetError as exc:
            raise BadRequestError(str(exc), param="overrides") from None
        return self.active
