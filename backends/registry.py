"""Backend name -> engine class, imported lazily so optional engines cost nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from backends.base import Engine, LoadOptions
from common.errors import BadRequestError

BACKENDS = ("llamacpp",)


def detect_backend(path: Path, requested: str = "auto") -> str:
    """Pick the engine for a model path; 'auto' looks at what the path contains."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise BadRequestError(
                f"Backend '{requested}' is not available in this build. Available: {', '.join(BACKENDS)}.",
                param="backend",
            )
        return requested
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "llamacpp"
    if path.is_dir() and any(path.glob("*.gguf")):
        return "llamacpp"
    raise BadRequestError(
        f"Cannot tell which backend serves '{path.name}': only GGUF models are supported by the "
        "installed backends. Convert the model to GGUF or install a GPU backend.",
        param="backend",
    )


PROJECTOR_PREFIX = "mmproj"


def is_projector(path: Path) -> bool:
    """Vision projectors (mmproj*.gguf) sit beside models; they are never models themselves."""
    return path.name.lower().startswith(PROJECTOR_PREFIX)


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(f for f in path.glob("*.gguf") if not is_projector(f)) or sorted(path.glob("*.gguf"))
    # Split GGUFs (-00001-of-0000N) load from their first part.
    return files[0]


def find_projector(path: Path, requested: str | None) -> Path | None:
    """The vision projector for a model: `requested` (a path, or a file name in the model's folder; "none": no
    projector), else the first mmproj*.gguf in a model folder, else mmproj-NAME*.gguf beside a GGUF file NAME.gguf."""
    folder = path if path.is_dir() else path.parent
    if requested is not None:
        if requested.strip().lower() in ("", "none", "off"):
            return None
        candidate = Path(requested)
        candidate = candidate if candidate.is_absolute() else folder / candidate
        if not candidate.is_file():
            raise BadRequestError(
                f"Projector '{requested}' not found (looked for {candidate}). Put the mmproj GGUF in the model's "
                "folder and name it, or set mmproj to none.",
                param="mmproj",
            )
        return candidate
    if path.is_dir():
        found = sorted(f for f in path.glob("*.gguf") if is_projector(f))
    else:
        found = sorted(path.parent.glob(f"{PROJECTOR_PREFIX}-{path.stem}*.gguf"))
    return found[0] if found else None


def load_engine(
    kind: str,
    path: Path,
    name: str,
    options: LoadOptions,
    progress: Callable[[float], None] | None = None,
) -> Engine:
    """Blocking: load a model with the named backend."""
    if kind == "llamacpp":
        from backends.llamacpp.engine import LlamaCppEngine

        projector = find_projector(path, options.mmproj)
        options = replace(options, mmproj=str(projector) if projector is not None else None)
        return LlamaCppEngine.load(gguf_file(path), name, options, progress)
    raise BadRequestError(f"Unknown backend '{kind}'.", param="backend")
