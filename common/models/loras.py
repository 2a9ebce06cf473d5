"""LoRA adapters and draft models on disk: listing them, resolving names safely, applying a set.

Adapter names resolve only inside `lora.lora_dir`, draft model names only
inside `draft_model.draft_model_dir`, with the same confinement rules as
model names (no paths, `..` or leading dots). `apply_lora_set` loads a list
of adapters onto an engine and makes the ones that loaded its active set
(POST /v1/lora/load and the configured `lora.loras` both use it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import Engine, LoadOptions
from backends.registry import gguf_file
from common.errors import APIError, BadRequestError, ModelNotFoundError
from common.models.files import confine_name, scan_models, strip_gguf


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path  # the adapter's GGUF
    size_bytes: int


def scan_loras(lora_dir: Path) -> list[LoraFile]:
    """`NAME.gguf` files, and folders holding one adapter GGUF, directly inside lora_dir."""
    found: list[LoraFile] = []
    if not lora_dir.is_dir():
        return found
    for entry in sorted(lora_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".gguf":
            found.append(LoraFile(entry.stem, entry, entry.stat().st_size))
        elif entry.is_dir() and not (entry / ".incomplete").exists():
            ggufs = sorted(entry.glob("*.gguf"))
            if ggufs:
                found.append(LoraFile(entry.name, ggufs[0], ggufs[0].stat().st_size))
    return found


def _lookup(name: str, what: str, available: list[Any]) -> Any | None:
    """The entry called `name` (with or without .gguf) after the name is confined; None if absent."""
    confine_name(name, what)
    wanted = strip_gguf(name)
    return next((entry for entry in available if entry.name == wanted), None)


def find_lora(lora_dir: Path, name: str) -> LoraFile:
    available = scan_loras(lora_dir)
    found = _lookup(name, "lora", available)
    if found is not None:
        return found
    names = ", ".join(x.name for x in available) or "none"
    raise ModelNotFoundError(
        f"LoRA '{name}' is not in the LoRA directory '{lora_dir}'. Available: {names}. "
        "Put the adapter GGUF there (convert PEFT adapters with llama.cpp's convert_lora_to_gguf.py).",
        param="loras",
        code="lora_not_found",
    )


@dataclass(frozen=True)
class LoraSet:
    """What `apply_lora_set` did: the engine's new active set, and each name that did not load."""

    active: list[tuple[str, float]]  # (adapter, scaling), in the order asked
    failed: list[tuple[str, str]]  # (name as asked, why it did not load)


async def apply_lora_set(engine: Engine, lora_dir: Path, choices: Iterable[tuple[str, float]]) -> LoraSet:
    """Load each (name, scaling) adapter onto the engine (if not loaded yet) and make exactly the
    ones that loaded its active set. A name that does not resolve or load is reported, not raised."""
    active: list[tuple[str, float]] = []
    failed: list[tuple[str, str]] = []
    for name, scaling in choices:
        try:
            found = find_lora(lora_dir, name)
            await engine.load_lora(found.name, found.path)
        except APIError as exc:
            failed.append((name, exc.message))
            continue
        active.append((found.name, scaling))
    engine.set_loras(active)
    return LoraSet(active, failed)


def find_draft_model(draft_dir: Path, name: str) -> Path:
    """The GGUF of a draft model named in draft_dir."""
    available = [m for m in scan_models(draft_dir) if m.path.is_file() or any(m.path.glob("*.gguf"))]
    found = _lookup(name, "draft_model", available)
    if found is not None:
        return gguf_file(found.path)
    names = ", ".join(m.name for m in available) or "none"
    raise ModelNotFoundError(
        f"Draft model '{name}' is not in '{draft_dir}'. Available: {names}. Pick a small model with the "
        "same tokenizer as the main model.",
        param="draft_model_name",
    )


def draft_options(
    draft_dir: Path, mode: str | None, name: str | None, max_tokens: int | None, base: LoadOptions
) -> dict[str, Any]:
    """LoadOptions fields for speculative decoding, checked and resolved."""
    mode = mode or ("model" if name else base.draft_mode)
    out: dict[str, Any] = {"draft_mode": mode, "draft_max_tokens": max_tokens or base.draft_max_tokens}
    if mode == "model":
        if not name and not base.draft_model_path:
            raise BadRequestError(
                "draft_mode 'model' needs a draft model: set draft_model_name.", param="draft_model_name"
            )
        out["draft_model_path"] = str(find_draft_model(draft_dir, name)) if name else base.draft_model_path
    else:
        out["draft_model_path"] = None
    return out
