"""Backend name -> engine class, imported lazily so optional engines cost nothing."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from backends.base import Engine, LoadOptions
from common.errors import BadRequestError

BACKENDS = ("llamacpp", "transformers", "exllamav2", "exllamav3", "llamacpp_embedding", "infinity")
EMBEDDING_BACKENDS = ("llamacpp_embedding", "infinity")

# backend -> (modules it imports, the pyproject extra that installs them)
_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "llamacpp": (("llama_cpp",), "llamacpp"),
    "transformers": (("torch", "transformers"), "transformers"),
    "exllamav2": (("torch", "exllamav2"), "exllamav2"),
    "exllamav3": (("torch", "exllamav3"), "exllamav3"),
    "llamacpp_embedding": (("llama_cpp",), "llamacpp"),
    "infinity": (("infinity_emb",), "embeddings"),
}


def require_library(kind: str) -> None:
    """A clear 400 naming the extra to install when the backend's library is missing."""
    modules, extra = _NEEDS[kind]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BadRequestError(
            f"The {kind} backend needs {', '.join(missing)}, which is not installed. "
            f"Install it with: pip install '.[{extra}]' (then restart Parley).",
            param="backend",
            code="backend_not_installed",
        )


def _quant_method(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method).lower() if method else None


def sniff_backend(path: Path) -> str | None:
    """What a model path holds: *.gguf -> llamacpp; EXL2/EXL3 config -> exllama; other safetensors -> transformers."""
    if path.is_file():
        return "llamacpp" if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    if any(path.glob("*.gguf")):
        return "llamacpp"
    method = _quant_method(path)
    if method in ("exl2", "exl3"):
        return "exllamav2" if method == "exl2" else "exllamav3"
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "transformers"
    return None


def detect_backend(path: Path, requested: str = "auto") -> str:
    """Pick the engine for a model path; 'auto' looks at what the path contains."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise BadRequestError(
                f"Backend '{requested}' is not available in this build. Available: {', '.join(BACKENDS)}.",
                param="backend",
            )
        require_library(requested)
        return requested
    if is_embedding_folder(path):  # sentence-transformers folders and cross-encoders, before transformers
        require_library("infinity")
        return "infinity"
    kind = sniff_backend(path)
    if kind is None:
        raise BadRequestError(
            f"Cannot tell which backend serves '{path.name}': expected a GGUF file, an EXL2/EXL3 folder "
            "(config.json quantization_config.quant_method) or a Hugging Face folder (config.json + safetensors). "
            "Name one with 'backend'.",
            param="backend",
        )
    require_library(kind)
    return kind


def is_embedding_folder(path: Path) -> bool:
    """A sentence-transformers folder, or a Hugging Face sequence-classification model (a cross-encoder)."""
    from backends.infinity.engine import is_infinity_folder

    return is_infinity_folder(path)


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
    if kind not in BACKENDS:
        raise BadRequestError(f"Unknown backend '{kind}'.", param="backend")
    require_library(kind)
    if kind == "llamacpp":
        from backends.llamacpp.engine import LlamaCppEngine

        projector = find_projector(path, options.mmproj)
        options = replace(options, mmproj=str(projector) if projector is not None else None)
        return LlamaCppEngine.load(gguf_file(path), name, options, progress)
    if kind == "llamacpp_embedding":
        from backends.llamacpp.embedding import LlamaCppEmbeddingEngine

        return LlamaCppEmbeddingEngine.load(gguf_file(path), name, options, progress)
    if kind == "infinity":
        from backends.infinity.engine import InfinityEngine

        return InfinityEngine.load(path, name, options, progress)
    if kind == "transformers":
        from backends.transformers.engine import TransformersEngine

        return TransformersEngine.load(path, name, options, progress)
    if kind == "exllamav2":
        from backends.exllamav2.engine import ExLlamaV2Engine

        return ExLlamaV2Engine.load(path, name, options, progress)
    from backends.exllamav3.engine import ExLlamaV3Engine

    return ExLlamaV3Engine.load(path, name, options, progress)
