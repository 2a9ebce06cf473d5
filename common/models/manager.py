"""ModelManager: which models are loaded, which one a request gets, and loading them safely.

Several models may be loaded at once (`max_loaded_models`), each with its own
engine. Requests hold a lease on the model they use (`acquire` / `use`) for as
long as they run, streaming included, so the manager knows which models are
busy:
- a load runs in its own task; every request that needs that model waits for
  that one load, and a request that goes away does not cancel it;
- a load that needs room unloads the least recently used *idle* model, or
  waits up to `load_wait_timeout` for one to become idle and then refuses
  with 503 + Retry-After: running requests are never cut off to make room;
- a model idle for longer than its keep_alive is unloaded by a background
  task and loaded again (with the same options) by the next request naming it;
- an explicit unload (admin) ends that model's pending requests with an
  `unload` reason before its memory is freed.

Which model a name means is `_plan`'s job; the rules are listed in the README
("Several models").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from backends.base import LoadOptions
from backends.registry import detect_backend, load_engine
from common.errors import (
    BadRequestError,
    ModelNotFoundError,
    ModelNotLoadedError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from common.models.loaded import LoadedModel, ModelLease
from common.models.files import ModelFile, confine_name, read_defaults, scan_models
from common.formats.templating import ChatTemplate, TemplateError, list_templates, resolve_template

__all__ = ["LoadedModel", "ModelFile", "ModelLease", "ModelManager", "confine_name", "scan_models"]

FALLBACK_TEMPLATE = "chatml"
DEFAULT_NAMES = ("", "default")
_RETRY_SECONDS = 5


@dataclass
class _PendingLoad:
    task: asyncio.Task[LoadedModel]
    waiters: int = 0  # requests that get a lease on the result


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
        inline_loading: bool = False,
        inline_admin_only: bool = True,
        keep_alive: float | None = None,
        load_wait_timeout: float = 30.0,
        preset_dir: Path | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.template_dir = template_dir
        self.default_options = default_options
        self.backend = backend
        self.dummy_names = dummy_names
        self.max_loaded = max_loaded
        self.inline_loading = inline_loading
        self.inline_admin_only = inline_admin_only
        self.keep_alive = keep_alive
        self.load_wait_timeout = load_wait_timeout
        self.preset_dir = preset_dir
        self._loaded: dict[str, LoadedModel] = {}
        self._pending: dict[str, _PendingLoad] = {}
        # Unloaded for idleness: reloaded on demand with these options and backend.
        self._expired: dict[str, tuple[LoadOptions, str | None]] = {}
        self._closing = 0  # engines being closed (they still hold memory)
        self._lock = asyncio.Lock()  # one load at a time
        self._idle: asyncio.Event | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.default_name: str | None = None
        self.on_loaded: Callable[[str, float], None] | None = None  # (name, seconds), e.g. for metrics
        # Runs on every newly loaded model before requests can use it (e.g. configured LoRA adapters).
        self.prepare: Callable[[LoadedModel], Awaitable[None]] | None = None

    @classmethod
    def from_config(cls, config: Any, project_root: Path, options: LoadOptions) -> ModelManager:
        """The manager a ParleyConfig describes; `options` are the server's default load options."""
        m = config.model
        return cls(
            Path(m.model_dir),
            project_root / "templates",
            options,
            backend=m.backend,
            dummy_names=tuple(m.dummy_model_names) if m.use_dummy_models else (),
            max_loaded=m.max_loaded_models,
            inline_loading=m.inline_model_loading,
            inline_admin_only=m.inline_model_loading_admin_only,
            keep_alive=m.keep_alive,
            load_wait_timeout=m.load_wait_timeout,
            preset_dir=project_root / "sampler_overrides",
        )

    # -- lookup -------------------------------------------------------------
    def available(self) -> list[ModelFile]:
        return scan_models(self.model_dir)

    def find(self, name: str) -> ModelFile:
        entry = self._find_quiet(name)
        if entry is None:
            names = ", ".join(m.name for m in self.available()) or "none"
            raise ModelNotFoundError(
                f"Model '{name}' is not in the model directory '{self.model_dir}'. Available: {names}. "
                "Download one with `python main.py download REPO` or POST /v1/download.",
                param="model",
            )
        return entry

    def _find_quiet(self, name: str) -> ModelFile | None:
        confine_name(name)
        wanted = _stem(name)
        return next((m for m in self.available() if m.name == wanted), None)

    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    @property
    def loading(self) -> list[str]:
        return list(self._pending)

    @property
    def idle_unloaded(self) -> list[str]:
        """Models unloaded for idleness; the next request naming one loads it again."""
        return [n for n in self._expired if n not in self._loaded and n not in self._pending]

    @property
    def is_loading(self) -> bool:
        return bool(self._pending)

    def get(self, name: str | None = None) -> LoadedModel:
        """A loaded model by name (no name, "default" or a dummy name: the default model); never loads.

        For work that does not outlive the caller's synchronous code (a lease is for work that awaits).
        """
        if name and name not in DEFAULT_NAMES and name not in self.dummy_names:
            model = self._loaded.get(name) or self._loaded.get(_stem(name))
            if model is None:
                if len(self._loaded) == 1 and not self.inline_loading:
                    return next(iter(self._loaded.values()))  # single-model servers answer any name
                raise ModelNotFoundError(
                    f"Model '{name}' is not loaded. Loaded: {', '.join(self._loaded) or 'none'}. "
                    "Name a loaded model, or load it with POST /v1/model/load (admin key).",
                    param="model",
                )
            return model
        target = self._default()
        if isinstance(target, LoadedModel):
            return target
        raise self._nothing_loaded(target)

    def _default(self) -> LoadedModel | str | None:
        """The default model: the first one loaded (the startup model) while it is loaded or coming
        back (a name to wait for or reload), else any loaded model."""
        name = self.default_name
        if name in self._loaded:
            return self._loaded[name]
        if name is not None and (name in self._pending or name in self._expired):
            return name
        return next(iter(self._loaded.values()), None)

    def _nothing_loaded(self, coming: str | None = None) -> ModelNotLoadedError:
        if coming in self._expired:
            return ModelNotLoadedError(
                f"Model '{coming}' was unloaded after being idle (keep_alive); a generation request loads it "
                "again. Retry with one.", retry_after=2,
            )
        if self._pending:
            return ModelNotLoadedError("The model is still loading. Retry in a moment.", retry_after=2)
        return ModelNotLoadedError(
            "No model is loaded. Load one with POST /v1/model/load (admin key) and retry.", retry_after=2
        )

    # -- leases -----------------------------------------------------------------
    def _plan(self, name: str | None, admin: bool, always_load: bool) -> LoadedModel | str:
        """The loaded model a request gets now, or the name of the model to load (or wait for) first."""
        if not name or name in DEFAULT_NAMES or name in self.dummy_names:
            target = self._default()
            if target is None:
                raise self._nothing_loaded()
            return target
        for candidate in (name, _stem(name)):
            if candidate in self._loaded:
                return self._loaded[candidate]
            if candidate in self._pending:
                return candidate
        entry = self._find_quiet(name)
        if entry is not None and (always_load or entry.name in self._expired):
            return entry.name
        if always_load or self.inline_loading:
            if entry is None:
                self.find(name)  # raises 404 listing the available models
            assert entry is not None
            if self.inline_admin_only and not admin:
                raise PermissionDeniedError(
                    f"Model '{entry.name}' is not loaded, and loading it from a request needs the admin key "
                    f"(inline_model_loading_admin_only). Loaded: {', '.join(self._loaded) or 'none'}. "
                    "Use a loaded model, send the admin key, or ask an admin to POST /v1/model/load.",
                )
            return entry.name
        if len(self._loaded) == 1:
            return next(iter(self._loaded.values()))  # single-model servers answer any name
        if not self._loaded:
            raise self._nothing_loaded()
        where = "is in the model directory but not loaded" if entry else "is neither loaded nor in the model directory"
        raise ModelNotFoundError(
            f"Model '{name}' {where}. Loaded: {', '.join(self._loaded)}. Name a loaded model, or load it "
            "with POST /v1/model/load (admin key); inline_model_loading: true loads models on request.",
            param="model",
        )

    async def acquire(self, name: str | None = None, *, admin: bool = False, always_load: bool = False) -> ModelLease:
        """A lease on the model a request names, loading it first when the rules allow."""
        target = self._plan(name, admin, always_load)
        if isinstance(target, LoadedModel):
            target.active += 1
            target.last_used = time.monotonic()
            return ModelLease(self, target)
        pending = self._pending.get(target)
        if pending is None:
            options, backend = self._expired.get(target, (None, None))
            pending = self._start_load(self.find(target), options, None, backend, None)
        pending.waiters += 1
        try:
            model = await asyncio.shield(pending.task)
        except asyncio.CancelledError:
            if pending.task.done() and not pending.task.cancelled() and pending.task.exception() is None:
                self._release(pending.task.result())  # our reference was already counted
            else:
                pending.waiters -= 1
            raise
        return ModelLease(self, model)

    def use(self, name: str | None = None, *, admin: bool = False, always_load: bool = False) -> _Use:
        """`async with models.use(name) as model:` for work that ends with the block."""
        return _Use(self, name, admin, always_load)

    def _release(self, model: LoadedModel) -> None:
        model.active = max(0, model.active - 1)
        model.last_used = time.monotonic()
        if model.active == 0:
            self._idle_event().set()

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
        return self._idle

    # -- load ---------------------------------------------------------------------
    async def load(
        self,
        name: str,
        overrides: Mapping[str, Any] | None = None,
        progress: Callable[[float], None] | None = None,
        *,
        backend: str | None = None,
        reload: bool = False,
    ) -> LoadedModel:
        """Load a model (or return it when loaded). `overrides` are a load request's explicit fields;
        `reload` unloads a loaded model first so they apply. Concurrent calls share one load."""
        entry = self.find(name)
        was_default = self.default_name == entry.name
        previous: tuple[LoadOptions | None, str | None] | None = None  # what a failed reload falls back to
        while True:
            pending = self._pending.get(entry.name)
            if pending is not None:
                if not (overrides or backend):
                    return await asyncio.shield(pending.task)
                # That load has other options: let it finish, then load again with these.
                await asyncio.gather(asyncio.shield(pending.task), return_exceptions=True)
                reload = True
                continue
            if entry.name in self._loaded:
                if not reload:
                    return self._loaded[entry.name]
                old = self._loaded[entry.name]
                previous = (old.options, old.backend)
                await self.unload(entry.name)
                continue  # a request may have started loading it meanwhile
            break
        pending = self._start_load(entry, None, overrides, backend, progress)
        try:
            model = await asyncio.shield(pending.task)
        except Exception:
            if previous is None or previous[0] is None or entry.name in self._pending or entry.name in self._loaded:
                raise
            # The new options did not load: bring the model back as it was rather than leave it gone.
            logger.warning("Reloading {} with new options failed; loading it again with its previous options", entry.name)
            restore = self._start_load(entry, previous[0], None, previous[1], None)
            try:
                await asyncio.shield(restore.task)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                logger.exception("Restoring {} with its previous options failed too", entry.name)
            if was_default and entry.name in self._loaded:
                self.default_name = entry.name
            raise
        if was_default:
            self.default_name = entry.name  # a reload keeps the default model
        return model

    def _start_load(
        self,
        entry: ModelFile,
        options: LoadOptions | None,
        overrides: Mapping[str, Any] | None,
        backend: str | None,
        progress: Callable[[float], None] | None,
    ) -> _PendingLoad:
        """Start the one load of a model in its own task (a caller that leaves does not cancel it)."""
        task = asyncio.get_running_loop().create_task(
            self._load_task(entry, options, overrides, backend, progress), name=f"load {entry.name}"
        )
        pending = _PendingLoad(task)
        self._pending[entry.name] = pending
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: waiters re-raise it
        return pending

    async def _load_task(
        self,
        entry: ModelFile,
        options: LoadOptions | None,
        overrides: Mapping[str, Any] | None,
        backend: str | None,
        progress: Callable[[float], None] | None,
    ) -> LoadedModel:
        try:
            defaults = read_defaults(entry.defaults_path, self.preset_dir)
            if options is None:
                options = defaults.options(self.default_options, overrides)
            template = self.template_by_name(options.prompt_template)  # fail fast on a bad name
            async with self._lock:
                await self._make_room(entry.name)
                model = await self._load_locked(entry, options, template, progress, backend)
                model.defaults = defaults
                model.keep_alive = defaults.keep_alive if defaults.keep_alive_set else self.keep_alive
                model.active += self._pending[entry.name].waiters
                self._loaded[entry.name] = model
                self._expired.pop(entry.name, None)
                if self.default_name is None or self.default_name not in self._loaded:
                    self.default_name = entry.name
            self._watch_idle()
            return model
        finally:
            self._pending.pop(entry.name, None)

    async def _make_room(self, incoming: str) -> None:
        """Unload least recently used idle models until one more fits; wait for one to go idle if none is."""
        deadline = time.monotonic() + self.load_wait_timeout
        while len(self._loaded) + self._closing >= self.max_loaded:
            idle = [m for m in self._loaded.values() if not m.busy()]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                logger.info("Unloading idle model {} to make room for {}", victim.name, incoming)
                await self._close(victim, remember=False)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = ", ".join(f"{m.name} ({m.active} running)" for m in self._loaded.values())
                raise ServiceUnavailableError(
                    f"Cannot load '{incoming}' now: {self.max_loaded} model(s) are loaded and all are serving "
                    f"requests ({busy}). Retry in a few seconds, unload one with POST /v1/model/unload, or raise "
                    "max_loaded_models.",
                    retry_after=_RETRY_SECONDS,
                    code="models_busy",
                )
            event = self._idle_event()
            event.clear()
            try:
                # Leases wake this at once; engine activity outside leases is polled.
                await asyncio.wait_for(event.wait(), min(remaining, 0.25))
            except TimeoutError:
                pass

    async def _load_locked(
        self,
        entry: ModelFile,
        options: LoadOptions,
        template: ChatTemplate | None,
        progress: Callable[[float], None] | None,
        backend: str | None,
    ) -> LoadedModel:
        kind = detect_backend(entry.path, backend or self.backend)
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
        logger.info(
            "Loaded {} in {:.2f}s: context {} tokens, {} slots",
            entry.name, time.perf_counter() - started, engine.info.n_ctx, engine.stats().slots_total,
        )
        if self.on_loaded is not None:
            self.on_loaded(entry.name, time.perf_counter() - started)
        model = LoadedModel(entry.name, engine, template, options=options, backend=backend)
        if self.prepare is not None:
            try:
                await self.prepare(model)
            except Exception:  # noqa: BLE001 - a failed extra must not fail the load itself
                logger.exception("Preparing {} after its load failed; it serves without that step", entry.name)
        return model

    # -- templates ---------------------------------------------------------------
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

    # -- unload --------------------------------------------------------------------
    async def unload(self, name: str | None = None) -> list[str]:
        """Unload now (all models without a name): pending requests end with an `unload` reason."""
        if name:
            model = self._loaded.get(name) or self._loaded.get(_stem(name))
            if model is None:
                raise ModelNotLoadedError(
                    f"Model '{name}' is not loaded; nothing to unload. Loaded: {', '.join(self._loaded) or 'none'}.",
                    status=400,
                )
            names = [model.name]
        else:
            names = list(self._loaded)
        for n in names:
            self._expired.pop(n, None)
            if n in self._loaded:
                await self._close(self._loaded[n], remember=False)
        return names

    async def unload_when_idle(self, name: str) -> bool:
        """Unload now if idle (True), else as soon as its running requests end; reloaded on demand."""
        model = self._loaded.get(name)
        if model is None:
            return True
        model.keep_alive = 0.0
        if not model.busy():
            await self._close(model, remember=True)
            return True
        self._watch_idle()
        return False

    async def _close(self, model: LoadedModel, *, remember: bool) -> None:
        """Take a model out of service (synchronously: no lease can start after this) and free it."""
        if self._loaded.get(model.name) is not model:
            return
        del self._loaded[model.name]
        if remember and model.options is not None:
            self._expired[model.name] = (model.options, model.backend)
        if self.default_name == model.name and not remember:
            self.default_name = next(iter(self._loaded), None)
        self._closing += 1
        try:
            logger.info("Unloading model {}", model.name)
            await model.engine.close()
        finally:
            self._closing -= 1
            self._idle_event().set()

    # -- idle unload ----------------------------------------------------------------
    def _watch_idle(self) -> None:
        """Run the idle reaper while some loaded model has a keep_alive."""
        wanted = any(m.keep_alive is not None for m in self._loaded.values())
        if wanted and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="model keep_alive")

    async def _reap(self) -> None:
        while True:
            limits = [m.keep_alive for m in self._loaded.values() if m.keep_alive is not None]
            if not limits:
                return
            await asyncio.sleep(min(1.0, max(0.05, min(limits) / 4)))
            for model in list(self._loaded.values()):
                if model.keep_alive is None or model.busy() or model.idle_seconds() < model.keep_alive:
                    continue
                logger.info("Model {} idle for {:.0f}s (keep_alive): unloading", model.name, model.idle_seconds())
                try:
                    await self._close(model, remember=True)
                except Exception:  # noqa: BLE001 - the reaper must survive a failed close
                    logger.exception("Unloading idle model {} failed", model.name)

    async def set_keep_alive(self, model: LoadedModel, seconds: float | None) -> None:
        """A new keep_alive for a loaded model (Ollama's per-request keep_alive); 0 unloads it once idle."""
        model.keep_alive = seconds
        model.last_used = time.monotonic()
        if seconds == 0:
            await self.unload_when_idle(model.name)
        else:
            self._watch_idle()

    async def close(self) -> None:
        """Shutdown: let loads in progress finish, then unload everything."""
        loop = asyncio.get_running_loop()
        reaper, self._reaper = self._reaper, None
        if reaper is not None and not reaper.done() and reaper.get_loop() is loop:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        tasks = [p.task for p in self._pending.values() if p.task.get_loop() is loop]
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in list(self._loaded.values()):
            await self._close(model, remember=False)
        self._expired.clear()


class _Use:
    def __init__(self, manager: ModelManager, name: str | None, admin: bool, always_load: bool) -> None:
        self._args = (manager, name, admin, always_load)
        self._lease: ModelLease | None = None

    async def __aenter__(self) -> LoadedModel:
        manager, name, admin, always_load = self._args
        self._lease = await manager.acquire(name, admin=admin, always_load=always_load)
        return self._lease.model

    async def __aexit__(self, *exc: object) -> None:
        if self._lease is not None:
            self._lease.release()


def _stem(name: str) -> str:
    return name[:-5] if name.lower().endswith(".gguf") else name

