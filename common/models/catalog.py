"""The model directory as the ModelManager sees it: what it holds, what a name means, chat templates,
and opening one model into an engine (the blocking load runs in a thread, with a progress bar).

Nothing here knows which models are loaded; that bookkeeping is the manager's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from backends.base import LoadOptions
from backends.registry import detect_backend, is_embedding_folder, load_engine
from common.errors import BadRequestError, ModelNotFoundError
from common.formats.templating import ChatTemplate, TemplateError, list_templates, resolve_template
from common.models.files import ModelFile, confine_name, scan_models, strip_gguf
from common.models.gguf_info import read_gguf_info
from common.models.loaded import LoadedModel

FALLBACK_TEMPLATE = "chatml"
# GGUF architectures that are encoders: they embed (or rank), never generate.
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                                   "modern-bert", "neo-bert", "eurobert", "t5encoder"})


class ModelCatalog:
    def __init__(
        self, model_dir: Path, template_dir: Path, backend: str = "auto", extra_dirs: tuple[Path, ...] = ()
    ) -> None:
        self.model_dir = model_dir
        self.template_dir = template_dir
        self.backend = backend  # used when a load names none
        self.remote: dict[str, ModelFile] = {}  # models served by other servers (registered, never loaded here)
        self.extra_dirs = tuple(d for d in extra_dirs if d != model_dir)  # e.g. embeddings.embedding_model_dir

    # -- models on disk ----------------------------------------------------------
    def available(self) -> list[ModelFile]:
        found = scan_models(self.model_dir) + list(self.remote.values())
        names = {m.name for m in found}
        for folder in self.extra_dirs:
            found += [m for m in scan_models(folder) if m.name not in names and not names.add(m.name)]
        return found

    def task_of(self, entry: ModelFile) -> str:
        """What a model on disk does, without loading it: `generate`, `embed` or `rerank` (a cross-encoder)."""
        if entry.format == "remote":  # remote models are chat/completion servers
            return "generate"
        if entry.format == "folder" and is_embedding_folder(entry.path):
            config = entry.path / "config.json"
            text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
            return "rerank" if "ForSequenceClassification" in text else "embed"
        gguf = entry.path if entry.format == "gguf" else next(iter(sorted(entry.path.glob("*.gguf"))), None)
        if gguf is None:
            return "generate"
        info = read_gguf_info(gguf)
        pooling = info.metadata.get(f"{info.architecture}.pooling_type")
        if pooling is None and info.architecture not in ENCODER_ARCHITECTURES:
            return "generate"
        return "rerank" if str(pooling) == "4" else "embed"

    def find(self, name: str) -> ModelFile:
        """The model called `name` (with or without .gguf); 404 listing the directory when absent."""
        entry = self.find_quiet(name)
        if entry is None:
            names = ", ".join(m.name for m in self.available()) or "none"
            raise ModelNotFoundError(
                f"Model '{name}' is not in the model directory '{self.model_dir}'. Available: {names}. "
                "Download one with `python main.py download REPO` or POST /v1/download.",
                param="model",
            )
        return entry

    def find_quiet(self, name: str) -> ModelFile | None:
        """Like `find`, but None when absent (a name that could leave the directory still raises)."""
        confine_name(name)
        wanted = strip_gguf(name)
        return next((m for m in self.available() if m.name == wanted), None)

    # -- templates -----------------------------------------------------------------
    def template_by_name(self, name: str | None) -> ChatTemplate | None:
        if not name:
            return None
        try:
            return ChatTemplate.from_file(resolve_template(self.template_dir, name))
        except ValueError as exc:
            raise BadRequestError(str(exc), param="prompt_template") from exc
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc), param="prompt_template", code="template_not_found") from exc

    def templates(self) -> list[str]:
        return list_templates(self.template_dir)

    def own_template(self, model_name: str, source: str | None) -> ChatTemplate:
        """The template a model's metadata carries, or the fallback when it has none or it does not compile."""
        if source:
            try:
                return ChatTemplate.from_string(source, name=f"{model_name} (GGUF)")
            except TemplateError as exc:
                logger.warning("The chat template of {} does not compile ({}); using {}", model_name, exc,
                               FALLBACK_TEMPLATE)
        template = self.template_by_name(FALLBACK_TEMPLATE)
        assert template is not None
        return template

    # -- opening a model ---------------------------------------------------------------
    async def open(
        self,
        entry: ModelFile,
        options: LoadOptions,
        template: ChatTemplate | None,
        backend: str | None,
        progress: Callable[[float], None] | None,
    ) -> LoadedModel:
        """Load the model's engine in a thread; `template` None means the model's own template.

        `backend` None means the catalog's default; the LoadedModel remembers the one asked for."""
        kind = detect_backend(entry.path, backend or self.backend)
        if kind == "llamacpp" and self.task_of(entry) != "generate":
            kind = "llamacpp_embedding"
        started = time.perf_counter()
        logger.info("Loading model {} ({}, backend {})", entry.name, entry.path, kind)
        with Progress(
            TextColumn("[bold]Loading {task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task(entry.name, total=1.0)

            def report(value: float) -> None:
                bar.update(task, completed=value)
                if progress is not None:
                    progress(value)

            engine = await asyncio.to_thread(load_engine, kind, entry.path, entry.name, options, report)
        if template is None:
            template = self.own_template(entry.name, engine.info.chat_template)
        logger.info(
            "Loaded {} in {:.2f}s: context {} tokens, {} slots",
            entry.name, time.perf_counter() - started, engine.info.n_ctx, engine.stats().slots_total,
        )
        return LoadedModel(entry.name, engine, template, options=options, backend=backend)
