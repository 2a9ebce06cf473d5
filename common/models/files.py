"""The model directory: which models exist, what they are, and their per-model defaults.

A model is a GGUF file or a folder directly inside the model directory (a
folder holding GGUF files, or a Hugging Face folder with `config.json`).
Its name is the file's stem or the folder's name.

Per-model defaults live beside the model:
- a folder model: `parley.yml` inside the folder (or TabbyAPI's
  `tabby_config.yml`, whose `model:` section is read and other keys ignored);
- a GGUF file `NAME.gguf`: `NAME.parley.yml` next to it.

    model:            # load options, as in config.yml's model section
      max_seq_len: 4096
      max_batch_size: 4
      prompt_template: chatml
      keep_alive: 10m # unload after 10 idle minutes (seconds, or 30s / 10m / 1h; null: never)
    sampling:         # default sampler fields, sampler_overrides/*.yml syntax
      temperature: 0.7
      min_p: {override: 0.05, force: true}
    sampling_preset: precise   # or a preset from sampler_overrides/ (sampling: entries win)

Load options settle as: server config < this file < the fields of a
POST /v1/model/load request.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from loguru import logger
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    create_model,
)
from ruamel.yaml import YAML, YAMLError

from backends.base import LoadOptions
from backends.registry import is_projector
from common.errors import BadRequestError
from common.models.gguf_info import parameter_size, read_gguf_info_async
from common.models.presets import Preset, PresetError, load_preset

DEFAULTS_FILE = "parley.yml"
TABBY_DEFAULTS_FILE = "tabby_config.yml"


@dataclass
class ModelFile:
    name: str
    path: Path
    size_bytes: int
    format: str  # "gguf" | "folder"
    modified: float
    defaults_path: Path | None = None


def confine_name(name: str, what: str = "model") -> str:
    """Refuse names that could leave their directory."""
    if (
        not name
        or name.strip() != name
        or "/" in name
        or "\\" in name
        or ".." in name
        or name.startswith(("~", "."))
        or Path(name).is_absolute()
        or "\x00" in name
    ):
        raise BadRequestError(
            f"Invalid {what} name '{name[:100]}': use a plain name as listed by the server "
            "(no paths, '..' or leading dots).",
            param=f"{what}_name" if what != "model" else "model_name",
        )
    return name


def strip_gguf(name: str) -> str:
    """A model name as the directory lists it: `NAME.gguf` means `NAME`."""
    return name[:-5] if name.lower().endswith(".gguf") else name


def defaults_file_of(path: Path) -> Path | None:
    """The per-model defaults file of a model file or folder, if there is one."""
    if path.is_dir():
        candidates = [path / DEFAULTS_FILE, path / "parley.yaml", path / TABBY_DEFAULTS_FILE]
    else:
        candidates = [path.with_name(f"{path.stem}.parley.yml"), path.with_name(f"{path.stem}.parley.yaml")]
    return next((c for c in candidates if c.is_file()), None)


def scan_models(model_dir: Path) -> list[ModelFile]:
    """GGUF files and model folders directly inside model_dir, sorted by name."""
    found: list[ModelFile] = []
    if not model_dir.is_dir():
        return found
    for entry in sorted(model_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            stat = entry.stat()
        except OSError:
            continue
        if entry.is_file() and entry.suffix.lower() == ".gguf" and not entry.name.endswith(".part") \
                and not is_projector(entry):
            found.append(ModelFile(entry.stem, entry, stat.st_size, "gguf", stat.st_mtime, defaults_file_of(entry)))
        elif entry.is_dir() and not (entry / ".incomplete").exists():
            ggufs = sorted(entry.glob("*.gguf"))
            has_hf = (entry / "config.json").exists()
            if ggufs or has_hf:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                found.append(ModelFile(entry.name, entry, size, "folder", stat.st_mtime, defaults_file_of(entry)))
    return found


# -- durations -------------------------------------------------------------------
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a number or a duration such as "90s", "10m", "1h30m"; negative or None means forever.

    Raises ValueError for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as 10m")  # noqa: TRY004
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f"'{text[:40]}' is not a duration: use seconds (300) or a duration such as 90s, 10m, 1h30m"
                ) from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return None if seconds < 0 else seconds


# -- per-model defaults ------------------------------------------------------------
@dataclass(frozen=True)
class ModelDefaults:
    """What a model's defaults file sets (empty when it has none)."""

    path: Path | None = None
    load: Mapping[str, Any] = field(default_factory=dict)  # LoadOptions fields
    keep_alive_set: bool = False
    keep_alive: float | None = None
    sampling: Preset | None = None

    def options(self, base: LoadOptions, overrides: Mapping[str, Any] | None = None) -> LoadOptions:
        """server defaults < this file < the load request's fields."""
        known = {f.name for f in dataclasses.fields(LoadOptions)}
        changes = {k: v for k, v in self.load.items() if k in known}
        changes.update({k: v for k, v in (overrides or {}).items() if k in known and v is not None})
        return dataclasses.replace(base, **changes)


def _config_constraints() -> dict[str, Any]:
    from common.config.loader import ModelConfig

    return dict(ModelConfig.model_fields)


@cache
def _model_section(strict: bool) -> type[BaseModel]:
    """The `model:` section: every LoadOptions field (with config.yml's bounds) plus keep_alive."""
    hints = typing.get_type_hints(LoadOptions)
    config_fields = _config_constraints()
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(LoadOptions):
        info = config_fields.get(f.name)
        annotation: Any = hints.get(f.name, Any)
        if info is not None and info.annotation is not None:
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[f.name] = (annotation | None, None)
    fields["keep_alive"] = (Annotated[float | None, BeforeValidator(parse_keep_alive)], None)
    config = ConfigDict(extra="forbid" if strict else "ignore", protected_namespaces=())
    return create_model("ModelDefaultsSection", __config__=config, **fields)


def _fail(path: Path, problem: str) -> BadRequestError:
    return BadRequestError(
        f"{path}: {problem} Fix the file (see README: per-model defaults) and load the model again.",
        param="model_name",
    )


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(_model_section(True).model_fields))
        return f"unknown key '{loc}'. Known keys under model: {known}."
    return f"'{loc}': {err['msg']}, got {str(err.get('input'))[:80]!r}."


def read_defaults(path: Path | None, preset_dir: Path | None = None) -> ModelDefaults:
    """Parse and validate a per-model defaults file; BadRequestError naming the file and key."""
    if path is None:
        return ModelDefaults()
    tabby = path.name == TABBY_DEFAULTS_FILE
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot be read ({exc}).") from None
    except YAMLError as exc:
        raise _fail(path, f"is not valid YAML ({str(exc).splitlines()[0]}).") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise _fail(path, "must be a mapping with the sections model:, sampling:, sampling_preset:.")
    if tabby:
        if "model" not in raw:
            logger.warning("{}: no 'model:' section, nothing applied (TabbyAPI nests load options under model:)", path)
        raw = {"model": raw.get("model") or {}}
    unknown = sorted(str(k) for k in raw if k not in ("model", "sampling", "sampling_preset"))
    if unknown:
        raise _fail(path, f"unknown section {', '.join(unknown)}; use model:, sampling: and sampling_preset:.")
    section = raw.get("model") or {}
    if not isinstance(section, dict):
        raise _fail(path, "'model' must be a mapping of load options such as max_seq_len: 4096.")
    try:
        parsed = _model_section(not tabby).model_validate(section)
    except ValidationError as exc:
        problems = " ".join(_describe({**e, "loc": ("model", *e["loc"])}) for e in exc.errors())
        raise _fail(path, problems) from None
    if tabby:
        ignored = sorted(set(section) - set(parsed.model_fields_set))
        if ignored:
            logger.info("{}: keys without a Parley equivalent are ignored: {}", path, ", ".join(ignored))
    load = {k: v for k, v in parsed.model_dump(exclude_unset=True).items() if k != "keep_alive"}
    return ModelDefaults(
        path=path,
        load=load,
        keep_alive_set="keep_alive" in parsed.model_fields_set,
        keep_alive=parsed.keep_alive,  # type: ignore[attr-defined]
        sampling=_sampling(path, raw.get("sampling"), raw.get("sampling_preset"), preset_dir),
    )


def _sampling(path: Path, fields: Any, preset_name: Any, preset_dir: Path | None) -> Preset | None:
    base: Preset | None = None
    if preset_name is not None:
        if not isinstance(preset_name, str) or preset_dir is None:
            raise _fail(path, "'sampling_preset' must be the name of a preset in sampler_overrides/.")
        try:
            base = load_preset(preset_dir, preset_name)
        except (FileNotFoundError, ValueError) as exc:
            raise _fail(path, f"sampling_preset: {exc}") from None
    if fields is None:
        return base
    try:
        own = Preset.from_mapping(path.name, fields, f"{path} sampling")
    except PresetError as exc:
        raise _fail(path, str(exc).removeprefix(f"{path} ")) from None
    return combine_presets(base, own, name=path.name)


def combine_presets(base: Preset | None, top: Preset | None, *, name: str | None = None) -> Preset | None:
    """One preset with top's entries replacing base's, field by field."""
    if base is None or not base.entries:
        return top
    if top is None or not top.entries:
        return base
    entries = {**base.entries, **top.entries}
    return Preset(name or f"{base.name}+{top.name}", types.MappingProxyType(entries), top.path)


# -- what a model is ---------------------------------------------------------------
def _hf_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def describe_file(entry: ModelFile) -> dict[str, Any]:
    """Format, size and what the file's metadata says (cached per file signature)."""
    from backends.registry import gguf_file

    out: dict[str, Any] = {
        "format": entry.format,
        "size_bytes": entry.size_bytes,
        "architecture": "",
        "context_length": 0,
        "quantization": "",
        "parameter_count": 0,
        "parameter_size": "",
    }
    gguf = entry.path if entry.format == "gguf" else None
    if entry.format == "folder" and any(entry.path.glob("*.gguf")):
        gguf = gguf_file(entry.path)
    if gguf is not None:
        info = await read_gguf_info_async(gguf)
        out["format"] = "gguf" if entry.format == "gguf" else "gguf folder"
        if info.error:
            out["metadata_error"] = info.error
        else:
            out.update(
                architecture=info.architecture,
                context_length=info.context_length,
                quantization=info.file_type,
                parameter_count=info.parameter_count,
                parameter_size=parameter_size(info),
            )
    elif entry.format == "folder":
        hf = _hf_config(entry.path)
        archs = hf.get("architectures") or [hf.get("model_type", "")]
        quant = hf.get("quantization_config") or {}
        out.update(
            format="hf folder",
            architecture=str(archs[0] if archs else ""),
            context_length=int(hf.get("max_position_embeddings") or 0),
            quantization=str(quant.get("quant_method") or hf.get("torch_dtype") or ""),
        )
    return out
