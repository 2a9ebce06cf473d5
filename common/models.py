"""ModelManager: which models exist, which are loaded, and loading them safely.

Names resolve only inside the model directory. A load runs in a worker thread
and reports progress; requests for a model that is loading wait for that one
load; unloading finishes every pending request of that model with an
`unload` reason before the memory is freed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from backends.base import Engine, LoadOptions, ModelInfo
from backends.registry import detect_backend, load_engine
from common.constraints import ConstraintCompiler, TokenizerAdapter
from common.errors import BadRequestError, ModelNotFoundError, ModelNotLoadedError
from common.templating import ChatTemplate, TemplateError, list_templates, resolve_template

FALLBACK_TEMPLATE = "chatml"


@dataclass
class ModelFile:
    name: str
    path: Path
    size_bytes: int
    format: str  # "gguf" | "folder"
    modified: float


@dataclass
class LoadedModel:
    name: str
    engine: Engine
    template: ChatTemplate | None
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    _compiler: ConstraintCompiler | None = None
    _compiler_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    async def constraint_compiler(self) -> ConstraintCompiler:
        """Built on first use (reading the whole vocabulary takes a fraction of a second)."""
        async with self._compiler_lock:
            if self._compiler is None:
                self._compiler = await asyncio.to_thread(self._build_compiler)
            return self._compiler

    def _build_compiler(self) -> ConstraintCompiler:
        info, engine = self.info, self.engine
        pieces = [engine.token_piece(t) for t in range(info.n_vocab)]
        adapter = TokenizerAdapter.from_pieces(
            pieces,
            info.eog_token_ids or (info.eos_token_id,),
            info.control_token_ids,
            bos_token=info.bos_token_id,
            n_vocab=info.n_vocab,
            tokenize=lambda data: engine.tokenize(data.decode("utf-8", "replace"), add_bos=False, special=False),
        )
        return ConstraintCompiler(adapter)


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
        if entry.is_file() and entry.suffix.lower() == ".gguf" and not entry.name.endswith(".part"):
            found.append(ModelFile(entry.stem, entry, stat.st_size, "gguf", stat.st_mtime))
        elif entry.is_dir() and not (entry / ".incomplete").exists():
            ggufs = sorted(entry.glob("*.gguf"))
            has_hf = (entry / "config.json").exists()
            if ggufs or has_hf:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                found.append(ModelFile(entry.name, entry, size, "folder", stat.st_mtime))
    return found


class ModelManager:
    def __init__(
        self,
        model_dir: Path,
        template_dir: Path,
        default_options: LoadOptions,
        *,
        backend: str = "auto",
        dummy_names: tuple[str, ...] = (),
        max_loaded: int = 1,
    ) -> None:
        self.model_dir = model_dir
        self.template_dir = template_dir
        self.default_options = default_options
        self.backend = backend
        self.dummy_names = dummy_names
        self.max_loaded = max_loaded
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._lock = asyncio.Lock()
        self.default_name: str | None = None
        self.on_loaded: Callable[[str, float], None] | None = None  # (name, seconds), e.g. for metrics

    # -- lookup -------------------------------------------------------------
    def available(self) -> list[ModelFile]:
        return scan_models(self.model_dir)

    def find(self, name: str) -> ModelFile:
        confine_name(name)
        wanted = name[:-5] if name.lower().endswith(".gguf") else name
        for m in self.available():
            if m.name == wanted:
                return m
        names = ", ".join(m.name for m in self.available()) or "none"
        raise ModelNotFoundError(
            f"Model '{name}' is not in the model directory '{self.model_dir}'. Available: {names}. "
            "Download one with `python main.py download REPO` or POST /v1/download.",
            param="model",
        )

    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    @property
    def is_loading(self) -> bool:
        return bool(self._loading)

    def get(self, name: str | None = None) -> LoadedModel:
        """The loaded model a request names; no name (or a dummy name) means the default one."""
        if name and name in self._loaded:
            model = self._loaded[name]
        elif name and name not in self.dummy_names and self._loaded and name not in ("", "default"):
            stem = name[:-5] if name.lower().endswith(".gguf") else name
            model = self._loaded.get(stem)  # type: ignore[assignment]
            if model is None:
                # One loaded model answers to any name, as single-model servers do.
                if len(self._loaded) == 1:
                    model = next(iter(self._loaded.values()))
                else:
                    raise ModelNotFoundError(
                        f"Model '{name}' is not loaded. Loaded: {', '.join(self._loaded)}.",
                        param="model",
                    )
        else:
            model = self._loaded.get(self.default_name or "") or next(iter(self._loaded.values()), None)  # type: ignore[assignment]
        if model is None:
            raise ModelNotLoadedError(
                "No model is loaded. Load one with POST /v1/model/load (admin key) and retry."
                if not self._loading
                else "The model is still loading. Retry in a moment.",
                retry_after=2,
            )
        model.last_used = time.monotonic()
        return model

    # -- load / unload --------------------------------------------------------
    async def load(
        self,
        name: str,
        options: LoadOptions | None = None,
        progress: Callable[[float], None] | None = None,
        *,
        backend: str | None = None,
    ) -> LoadedModel:
        """Load a model (or return it when already loaded). Concurrent calls share one load."""
        entry = self.find(name)
        if entry.name in self._loaded:
            return self._loaded[entry.name]
        pending = self._loading.get(entry.name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._loading[entry.name] = fut
        try:
            async with self._lock:
                while len(self._loaded) >= self.max_loaded:
                    oldest = min(self._loaded.values(), key=lambda m: m.last_used)
                    await self._unload_locked(oldest.name)
                model = await self._load_locked(entry, options or self.default_options, progress, backend)
            fut.set_result(model)
            return model
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading.pop(entry.name, None)

    async def _load_locked(
        self,
        entry: ModelFile,
        options: LoadOptions,
        progress: Callable[[float], None] | None,
        backend: str | None,
    ) -> LoadedModel:
        kind = detect_backend(entry.path, backend or self.backend)
        template = self.template_by_name(options.prompt_template)
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
        if template is None and engine.info.chat_template:
            try:
                template = ChatTemplate.from_string(engine.info.chat_template, name=f"{entry.name} (GGUF)")
            except TemplateError as exc:
                logger.warning("The model's own chat template does not compile ({}); using {}", exc, FALLBACK_TEMPLATE)
        if template is None:
            template = self.template_by_name(FALLBACK_TEMPLATE)
        model = LoadedModel(entry.name, engine, template)
        self._loaded[entry.name] = model
        if self.default_name is None or self.default_name not in self._loaded:
            self.default_name = entry.name
        logger.info(
            "Loaded {} in {:.2f}s: context {} tokens, {} slots",
            entry.name, time.perf_counter() - started, engine.info.n_ctx, engine.stats().slots_total,
        )
        if self.on_loaded is not None:
            self.on_loaded(entry.name, time.perf_counter() - started)
        return model

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

    def switch_template(self, template_name: str, model_name: str | None = None) -> ChatTemplate:
        model = self.get(model_name)
        template = self.template_by_name(template_name)
        assert template is not None
        model.template = template
        return template

    def unload_template(self, model_name: str | None = None) -> None:
        """Back to the model's own template (or the fallback)."""
        model = self.get(model_name)
        own = model.info.chat_template
        model.template = (
            ChatTemplate.from_string(own, name=f"{model.name} (GGUF)") if own else self.template_by_name(FALLBACK_TEMPLATE)
        )

    async def unload(self, name: str | None = None) -> list[str]:
        async with self._lock:
            names = [name] if name else list(self._loaded)
            for n in names:
                if n not in self._loaded:
                    raise ModelNotLoadedError(f"Model '{n}' is not loaded; nothing to unload.", status=400)
                await self._unload_locked(n)
            return names

    async def _unload_locked(self, name: str) -> None:
        model = self._loaded.pop(name)
        if self.default_name == name:
            self.default_name = next(iter(self._loaded), None)
        logger.info("Unloading model {}", name)
        await model.engine.close()

    async def close(self) -> None:
        await self.unload() if self._loaded else None
