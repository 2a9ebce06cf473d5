"""Remote models from the config: `remote.remote_models` and `NAME.remote.yml` files in the model directory.

`remote_specs` validates them all before the server starts: a duplicate name,
a missing API-key variable or a malformed URL is a ConfigError naming the key
(an unknown kind is the schema's). `check_reachable` then asks every replica
once; one that cannot be reached stops the start too. `open_remote` builds the
engine (its health checks start) and the LoadedModel the manager registers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError
from ruamel.yaml import YAML, YAMLError

from backends.remote.engine import RemoteEngine
from backends.remote.spec import RemoteSpec
from common.config.loader import ConfigError, ParleyConfig
from common.config.schema import RemoteModelEntry
from common.formats.templating import ChatTemplate
from common.models.files import scan_models
from common.models.loaded import LoadedModel

FILE_SUFFIX = ".remote.yml"
FALLBACK_TEMPLATE = "chatml"


def _entries(config: ParleyConfig, model_dir: Path) -> list[tuple[str, RemoteModelEntry]]:
    """(where it is declared, entry) for config entries then model-directory files."""
    out = [(f"remote.remote_models[{i}]", e) for i, e in enumerate(config.remote.remote_models)]
    if not model_dir.is_dir():
        return out
    for path in sorted(model_dir.glob(f"*{FILE_SUFFIX}")):
        try:
            raw = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read it as YAML ({exc}). Fix or remove the file.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a mapping of remote-model keys (kind:, replicas:, ...).")
        raw.setdefault("name", path.name[: -len(FILE_SUFFIX)])
        try:
            out.append((str(path), RemoteModelEntry.model_validate(raw)))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(file)"
            raise ConfigError(f"{path}: {key}: {err['msg']}. Fix it in the file.") from None
    return out


def remote_specs(config: ParleyConfig, environ: Mapping[str, str] | None = None) -> list[RemoteSpec]:
    """Every remote model the config declares, checked; raises ConfigError naming the key at fault."""
    environ = os.environ if environ is None else environ
    model_dir = Path(config.model.model_dir)
    local = {m.name for m in scan_models(model_dir)}
    seen: dict[str, str] = {}
    specs = []
    for where, e in _entries(config, model_dir):
        if e.name in seen:
            raise ConfigError(f"{where}.name: '{e.name}' is already declared by {seen[e.name]}. Names must be unique.")
        if e.name in local:
            raise ConfigError(f"{where}.name: '{e.name}' is also a model in {model_dir}. Rename one of them.")
        seen[e.name] = where
        for j, url in enumerate(e.replicas):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{where}.replicas[{j}]: '{url}' is not an http(s) URL like http://host:8000.")
        key = None
        if e.api_key_env:
            key = environ.get(e.api_key_env)
            if not key:
                raise ConfigError(
                    f"{where}.api_key_env: the environment variable {e.api_key_env} is not set. Set it to the "
                    "upstream's API key, or remove api_key_env if the upstream needs none."
                )
        specs.append(RemoteSpec(
            name=e.name, kind=e.kind, replicas=tuple(u.rstrip("/") for u in e.replicas),
            upstream_model=e.upstream_model or e.name, server=e.server, api_key=key, routing=e.routing,
            max_inflight=e.max_inflight, connect_timeout=e.connect_timeout, read_timeout=e.read_timeout,
            health_interval=e.health_interval, eject_seconds=e.eject_seconds, retries=e.retries,
            affinity_prefix_chars=e.affinity_prefix_chars, affinity_load_factor=e.affinity_load_factor,
            context_length=e.context_length, chat=e.chat, strict_sampling=e.strict_sampling,
        ))
    return specs


def templates_of(config: ParleyConfig) -> dict[str, str]:
    """Remote model name -> the template its text prompts use."""
    model_dir = Path(config.model.model_dir)
    return {e.name: e.prompt_template or FALLBACK_TEMPLATE for _, e in _entries(config, model_dir)}


def check_reachable(specs: list[RemoteSpec], config: ParleyConfig) -> None:
    """Ask every replica once (blocking, before the server starts); raises ConfigError for one that
    cannot be reached. An answer of any status counts (llama-server answers 503 while loading)."""
    where = {e.name: w for w, e in _entries(config, Path(config.model.model_dir))}
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
        for spec in specs:
            for j, url in enumerate(spec.replicas):
                try:
                    client.get(url + spec.health_path, timeout=httpx.Timeout(5.0, connect=spec.connect_timeout))
                except httpx.HTTPError as exc:
                    raise ConfigError(
                        f"{where.get(spec.name, spec.name)}.replicas[{j}]: {url} cannot be reached "
                        f"({type(exc).__name__}: {exc}). Start that server first, or fix the URL."
                    ) from None


async def open_remote(spec: RemoteSpec, template: ChatTemplate | None) -> LoadedModel:
    engine = RemoteEngine(spec)
    await engine.start()
    return LoadedModel(spec.name, engine, template, backend="remote")
