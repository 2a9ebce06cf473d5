"""Backend name -> engine class, imported lazily so optional engines cost nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backends.base import Engine, LoadOptions
from common.errors import BadRequestError

BACKENDS = ("llamacpp", "llamacpp_embedding", "infinity")
EMBEDDING_BACKENDS = ("llamacpp_embedding", "infinity")


def detect_backend(path: Path, requested: str = "auto") -> str:
    """Pick the engine for a model path; 'auto' looks at what the path contains."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise BadRequestError(
                f"Backend '{requested}' is not available in this build. Available: {', '.join(BACKENDS)}.",
                param="backend",
            )
        return requested
    if is_embedding_folder(path):
        return "infinity"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "llamacpp"
    if path.is_dir() and any(path.glob("*.gguf")):
        return "llamacpp"
    raise BadRequestError(
        f"Cannot tell which backend serves '{path.name}': only GGUF models are supported by the "
        "installed backends. Convert the model to GGUF or install a GPU backend.",
        param="backend",
    )


def is_embedding_folder(path: Path) -> bool:
    """A sentence-transformers folder, or a Hugging Face sequence-classification model (a cross-encoder)."""
    from backends.infinity.engine import is_infinity_folder

    return is_infinity_folder(path)


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    # Split GGUFs (-00001-of-0000N) load from their first part.
    return files[0]


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

        return LlamaCppEngine.load(gguf_file(path), name, options, progress)
    if kind == "llamacpp_embedding":
        from backends.llamacpp.embedding import LlamaCppEmbeddingEngine

        return LlamaCppEmbeddingEngine.load(gguf_file(path), name, options, progress)
    if kind == "infinity":
        from backends.infinity.engine import InfinityEngine

        return InfinityEngine.load(path, name, options, progress)
    raise BadRequestError(f"Unknown backend '{kind}'.", param="backend")
