"""Model cards for /v1/models, /v1/model/list, /v1/model and per-model /health entries.

OpenAI's shape (`id`, `object`, `created`, `owned_by`) with TabbyAPI's
`parameters` (load options of a loaded model) and what the file says about
itself: format, size, architecture, trained context length, quantization,
parameter count.
"""

from __future__ import annotations

import time
from typing import Any

from backends.registry import find_projector
from common.errors import APIError
from common.models.files import ModelFile, describe_file
from common.models.manager import LoadedModel, ModelManager


def state_of(models: ModelManager, name: str) -> str:
    if name in models.loaded:
        return "loaded"
    return "loading" if name in models.loading else "available"


def _defaults_file(entry: ModelFile | None) -> str | None:
    if entry is None or entry.defaults_path is None:
        return None
    return str(entry.defaults_path.relative_to(entry.path.parent))


def load_parameters(model: LoadedModel) -> dict[str, Any]:
    info = model.info
    return {
        **info.load_options,
        "backend": info.backend,
        "prompt_template": model.template.name if model.template else None,
        "prompt_template_content": model.template.source if model.template else None,
        "n_ctx_train": info.n_ctx_train,
        "architecture": info.architecture,
        "quantization": info.quantization,
        "parameter_count": info.parameter_count,
        "size_bytes": info.size_bytes,
        "keep_alive": model.keep_alive,
        "sampling_defaults": model.defaults.sampling.describe() if model.defaults.sampling else {},
    }


async def card(models: ModelManager, name: str, entry: ModelFile | None = None) -> dict[str, Any]:
    """One model, loaded or not; `entry` is its file when it is in the model directory."""
    model = models.loaded.get(name)
    created = int(model.loaded_at) if model else int(entry.modified) if entry else int(time.time())
    out: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "parley",
        "state": state_of(models, name),
        "loaded": model is not None,
        "default": models.default_name == name,
        "defaults_file": _defaults_file(entry),
    }
    if entry is not None:
        out.update(await describe_file(entry))
    out["modalities"] = list(model.info.modalities) if model is not None else _file_modalities(entry)
    if model is not None:
        info = model.info
        out.setdefault("size_bytes", info.size_bytes)
        for key, value in (("architecture", info.architecture), ("quantization", info.quantization),
                           ("parameter_count", info.parameter_count), ("context_length", info.n_ctx_train)):
            if not out.get(key):
                out[key] = value
        out["active_requests"] = model.active
        out["idle_seconds"] = round(model.idle_seconds(), 1)
        out["parameters"] = load_parameters(model)
    return out


def _file_modalities(entry: ModelFile | None) -> list[str]:
    """What a model not loaded would read: vision when a projector sits beside it (mmproj*.gguf)."""
    if entry is None:
        return ["text"]
    try:
        return ["text", "vision"] if find_projector(entry.path, None) is not None else ["text"]
    except (OSError, APIError):
        return ["text"]


def dummy_card(name: str, default: str | None) -> dict[str, Any]:
    return {
        "id": name, "object": "model", "created": int(time.time()), "owned_by": "parley",
        "state": "alias", "loaded": default is not None, "alias_of": default,
    }


async def model_list(models: ModelManager, *, whole_directory: bool) -> list[dict[str, Any]]:
    """Dummy names first (as TabbyAPI), then loaded models, then (if shown) the rest of the directory."""
    files = {m.name: m for m in models.available()}
    default = models.default_name if models.default_name in models.loaded else None
    data = [dummy_card(n, default) for n in models.dummy_names]
    names = list(models.loaded) + [n for n in models.loading if n not in models.loaded]
    if whole_directory:
        names += [n for n in files if n not in names]
    for name in names:
        data.append(await card(models, name, files.get(name)))
    return data


def health_entry(model: LoadedModel) -> dict[str, Any]:
    st = model.engine.stats()
    return {
        "state": "failed" if st.failure else "loaded",
        "failure": st.failure,
        "active_requests": model.active,
        "idle_seconds": round(model.idle_seconds(), 1),
        "keep_alive": model.keep_alive,
        "slots_total": st.slots_total,
        "slots_active": st.slots_active,
        "queue_depth": st.queue_depth,
        "kv_cells_total": st.kv_cells_total,
        "kv_cells_used": st.kv_cells_used,
        "kv_cells_cached": st.cached_prefix_tokens,
        "requests_finished": st.requests_finished,
        "tokens_generated": st.tokens_generated,
        "draft_tokens": st.draft_tokens,
        "accepted_draft_tokens": st.accepted_draft_tokens,
    }
