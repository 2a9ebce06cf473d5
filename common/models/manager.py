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

Embedding and rerank models (backends/embedding.py) are models like the others,
under the same rules, but count against their own `max_loaded_embedding` and
have their own default (the first loaded); embedding routes reach them
through `acquire_embedding`.

Which model a name means is routing.py's (README, "Several models"); the model
directory, templates and opening an engine are catalog.py's; idle eviction is
idle.py's. Settings (options.py) and hooks are given at construction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from backends.base import LoadOptions
from common.errors import BadRequestError, ModelNotLoadedError, ServiceUnavailableError
from common.formats.templating import ChatTemplate
from common.models.catalog import ModelCatalog
from common.models.files import ModelFile, confine_name, read_defaults, scan_models
from common.models.idle import IdleReaper
from common.models.loaded import LoadedModel, ModelLease
from common.models.options import ManagerSettings
from common.models.routing import PendingLoad, Roster

__all__ = ["LoadedModel", "ManagerSettings", "ModelFile", "ModelLease", "ModelManager", "confine_name", "scan_models"]

_RETRY_SECONDS = 5


class ModelManager:
    def __init__(
        self,
        settings: ManagerSettings,
        *,
        on_loaded: Callable[[str, float], None] | None = None,
        prepare: Callable[[LoadedModel], Awaitable[None]] | None = None,
    ) -> None:
        """`on_loaded(name, seconds)` hears of each load (e.g. metrics); `prepare` runs on each newly
        loaded model before requests can use it (e.g. configured LoRA adapters); a failing one is
        logged and the model serves without it."""
        self.settings = settings  # read at each use (a test may replace it); the catalog keeps its paths
        extra = (settings.embedding_model_dir,) if settings.embedding_model_dir else ()
        self.catalog = ModelCatalog(settings.model_dir, settings.template_dir, settings.backend, extra)
        self._on_loaded = on_loaded
        self._prepare = prepare
        self._roster = Roster()
        self._closing = 0  # engines being closed (they still hold memory)
        self._lock = asyncio.Lock()  # one load at a time
        self._idle: asyncio.Event | None = None
        self._reaper = IdleReaper(lambda: list(self._roster.loaded.values()), lambda m: self._close(m, remember=True))

    # -- settings, as routers read them -------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.settings.model_dir

    @property
    def default_options(self) -> LoadOptions:
        return self.settings.default_options

    @property
    def dummy_names(self) -> tuple[str, ...]:
        return self.settings.dummy_names

    @property
    def inline_loading(self) -> bool:
        return self.settings.inline_loading

    @property
    def inline_admin_only(self) -> bool:
        return self.settings.inline_admin_only

    # -- lookup -------------------------------------------------------------
    def available(self) -> list[ModelFile]:
        return self.catalog.available()

    def find(self, name: str) -> ModelFile:
        return self.catalog.find(name)

    def task_of(self, entry: ModelFile) -> str:
        """`generate`, `embed` or `rerank`, from the files alone."""
        return self.catalog.task_of(entry)

    @property
    def default_embedding_name(self) -> str | None:
        return self._roster.default_embedding

    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._roster.loaded)

    @property
    def loading(self) -> list[str]:
        return list(self._roster.pending)

    @property
    def idle_unloaded(self) -> list[str]:
        """Models unloaded for idleness; the next request naming one loads it again."""
        return self._roster.idle_unloaded()

    @property
    def default_name(self) -> str | None:
        """The model a request without a name gets: the first one loaded (the startup model)."""
        return self._roster.default_name

    @property
    def is_loading(self) -> bool:
        return bool(self._roster.pending)

    def get(self, name: str | None = None) -> LoadedModel:
        """A loaded model by name (no name, "default" or a dummy name: the default model); never loads.

        For work that does not outlive the caller's synchronous code (a lease is for work that awaits).
        """
        return self._roster.get(name, self.settings)

    # -- leases -----------------------------------------------------------------
    async def acquire(self, name: str | None = None, *, admin: bool = False, always_load: bool = False) -> ModelLease:
        """A lease on the model a request names, loading it first when the rules allow."""
        target = self._roster.plan(name, self.settings, self.catalog, admin=admin, always_load=always_load)
        return await self._lease(target)

    async def acquire_embedding(
        self, name: str | None = None, *, admin: bool = False, always_load: bool = False, task: str = "embed"
    ) -> ModelLease:
        """A lease on the embedding model an embeddings (`task` embed) or rerank route names (routing.py)."""
        target = self._roster.plan_embedding(
            name, self.settings, self.catalog, admin=admin, always_load=always_load, task=task
        )
        return await self._lease(target)

    async def _lease(self, target: LoadedModel | str) -> ModelLease:
        if isinstance(target, LoadedModel):
            target.active += 1
            target.last_used = time.monotonic()
            return ModelLease(target, self._release)
        pending = self._roster.pending.get(target)
        if pending is None:
            options, backend = self._roster.expired.get(target, (None, None))
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
        return ModelLease(model, self._release)

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
            pending = self._roster.pending.get(entry.name)
            if pending is not None:
                if not (overrides or backend):
                    return await asyncio.shield(pending.task)
                # That load has other options: let it finish, then load again with these.
                await asyncio.gather(asyncio.shield(pending.task), return_exceptions=True)
                reload = True
                continue
            if entry.name in self._roster.loaded:
                if not reload:
                    return self._roster.loaded[entry.name]
                old = self._roster.loaded[entry.name]
                previous = (old.options, old.backend)
                await self.unload(entry.name)
                continue  # a request may have started loading it meanwhile
            break
        pending = self._start_load(entry, None, overrides, backend, progress)
        try:
            model = await asyncio.shield(pending.task)
        except Exception:
            if previous is None or previous[0] is None or entry.name in self._roster.pending or entry.name in self._roster.loaded:
                raise
            # The new options did not load: bring the model back as it was rather than leave it gone.
            logger.warning("Reloading {} with new options failed; loading it again with its previous options", entry.name)
            restore = self._start_load(entry, previous[0], None, previous[1], None)
            try:
                await asyncio.shield(restore.task)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                logger.exception("Restoring {} with its previous options failed too", entry.name)
            if was_default and entry.name in self._roster.loaded:
                self._roster.default_name = entry.name
            raise
        if was_default:
            self._roster.default_name = entry.name  # a reload keeps the default model
        return model

    def _start_load(
        self,
        entry: ModelFile,
        options: LoadOptions | None,
        overrides: Mapping[str, Any] | None,
        backend: str | None,
        progress: Callable[[float], None] | None,
    ) -> PendingLoad:
        """Start the one load of a model in its own task (a caller that leaves does not cancel it)."""
        task = asyncio.get_running_loop().create_task(
            self._load_task(entry, options, overrides, backend, progress), name=f"load {entry.name}"
        )
        pending = PendingLoad(task)
        self._roster.pending[entry.name] = pending
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
            defaults = read_defaults(entry.defaults_path, self.settings.preset_dir)
            if options is None:
                options = defaults.options(self.settings.default_options, overrides)
            template = self.template_by_name(options.prompt_template)  # fail fast on a bad name
            embedding = await asyncio.to_thread(self.catalog.task_of, entry) != "generate"
            async with self._lock:
                await self._make_room(entry.name, embedding)
                model = await self._open(entry, options, template, progress, backend)
                model.defaults = defaults
                model.keep_alive = defaults.keep_alive if defaults.keep_alive_set else self.settings.keep_alive
                model.active += self._roster.pending[entry.name].waiters
                self._roster.loaded[entry.name] = model
                self._roster.expired.pop(entry.name, None)
                if embedding:
                    if self._roster.default_embedding not in self._roster.loaded:
                        self._roster.default_embedding = entry.name
                elif (self.default_name is None or self.default_name not in self._roster.loaded
                        or self._roster.loaded[self.default_name].backend == "remote"):
                    self._roster.default_name = entry.name
            self._reaper.watch()
            return model
        finally:
            self._roster.pending.pop(entry.name, None)

    async def _make_room(self, incoming: str, embedding: bool = False) -> None:
        """Unload least recently used idle models until one more fits; wait for one to go idle if none is.

        Embedding models count against `max_loaded_embedding`, chat models against `max_loaded`."""
        deadline = time.monotonic() + self.settings.load_wait_timeout
        limit = self.settings.max_loaded_embedding if embedding else self.settings.max_loaded

        def peers() -> list[LoadedModel]:
            return [m for m in self._roster.loaded.values() if m.is_embedding == embedding and m.backend != "remote"]

        while len(peers()) + self._closing >= limit:
            idle = [m for m in peers() if not m.busy()]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                logger.info("Unloading idle model {} to make room for {}", victim.name, incoming)
                await self._close(victim, remember=False)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = ", ".join(f"{m.name} ({m.active} running)" for m in peers())
                raise ServiceUnavailableError(
                    f"Cannot load '{incoming}' now: {limit} model(s) are loaded and all are serving "
                    f"requests ({busy}). Retry in a few seconds, unload one with POST /v1/model/unload, or raise "
                    + ("embeddings.max_loaded_embedding_models." if embedding else "max_loaded_models."),
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

    async def _open(
        self,
        entry: ModelFile,
        options: LoadOptions,
        template: ChatTemplate | None,
        progress: Callable[[float], None] | None,
        backend: str | None,
    ) -> LoadedModel:
        """The catalog opens the engine; then the hooks hear of it."""
        started = time.perf_counter()
        model = await self.catalog.open(entry, options, template, backend, progress)
        if self._on_loaded is not None:
            self._on_loaded(entry.name, time.perf_counter() - started)
        if self._prepare is not None:
            try:
                await self._prepare(model)
            except Exception:  # noqa: BLE001 - a failed extra must not fail the load itself
                logger.exception("Preparing {} after its load failed; it serves without that step", entry.name)
        return model

    def register(self, model: LoadedModel) -> None:
        """Serve a model opened elsewhere (a remote model): listed and leased like loaded ones, never
        unloaded for idleness or to make room, and default only when nothing local is."""
        self._roster.loaded[model.name] = model
        self.catalog.remote[model.name] = ModelFile(model.name, Path(f"remote:{model.name}"), 0, "remote", model.loaded_at)

    # -- templates ---------------------------------------------------------------
    def template_by_name(self, name: str | None) -> ChatTemplate | None:
        return self.catalog.template_by_name(name)

    def templates(self) -> list[str]:
        return self.catalog.templates()

    def switch_template(self, template_name: str, model_name: str | None = None) -> ChatTemplate:
        model = self.get(model_name)
        template = self.template_by_name(template_name)
        assert template is not None
        model.template = template
        return template

    def unload_template(self, model_name: str | None = None) -> None:
        """Back to the model's own template (or the fallback)."""
        model = self.get(model_name)
        model.template = self.catalog.own_template(model.name, model.info.chat_template)

    # -- unload --------------------------------------------------------------------
    async def unload(self, name: str | None = None) -> list[str]:
        """Unload now (all models without a name): pending requests end with an `unload` reason."""
        if name:
            model = self._roster.find_loaded(name)
            if model is None:
                raise ModelNotLoadedError(
                    f"Model '{name}' is not loaded; nothing to unload. Loaded: {self._roster.loaded_names()}.",
                    status=400,
                )
            if model.backend == "remote":
                raise BadRequestError(
                    f"'{model.name}' is a remote model: its servers are not loaded here, so there is nothing to "
                    "unload. Remove it from remote_models (or its .remote.yml file) and restart to stop serving it.",
                    param="model_name",
                )
            names = [model.name]
        else:
            names = [n for n, m in self._roster.loaded.items() if m.backend != "remote"]
        for n in names:
            self._roster.expired.pop(n, None)
            if n in self._roster.loaded:
                await self._close(self._roster.loaded[n], remember=False)
        return names

    async def unload_when_idle(self, name: str) -> bool:
        """Unload now if idle (True), else as soon as its running requests end; reloaded on demand."""
        model = self._roster.loaded.get(name)
        if model is None:
            return True
        if model.backend == "remote":
            return False  # served elsewhere: nothing here to free
        model.keep_alive = 0.0
        if not model.busy():
            await self._close(model, remember=True)
            return True
        self._reaper.watch()
        return False

    async def _close(self, model: LoadedModel, *, remember: bool) -> None:
        """Take a model out of service (synchronously: no lease can start after this) and free it."""
        if self._roster.loaded.get(model.name) is not model:
            return
        del self._roster.loaded[model.name]
        if remember and model.options is not None:
            self._roster.expired[model.name] = (model.options, model.backend)
        if self.default_name == model.name and not remember:
            self._roster.default_name = next((m.name for m in self._roster.chat_models()), None)
        if self._roster.default_embedding == model.name and not remember:
            others = [m.name for m in self._roster.loaded.values() if m.is_embedding]
            self._roster.default_embedding = others[0] if others else None
        self._closing += 1
        try:
            logger.info("Unloading model {}", model.name)
            await model.engine.close()
        finally:
            self._closing -= 1
            self._idle_event().set()

    # -- keep_alive and shutdown ---------------------------------------------------
    async def set_keep_alive(self, model: LoadedModel, seconds: float | None) -> None:
        """A new keep_alive for a loaded model (Ollama's per-request keep_alive); 0 unloads it once idle.
        A remote model ignores it: its servers stay up whatever one client asks."""
        if model.backend == "remote":
            return
        model.keep_alive = seconds
        model.last_used = time.monotonic()
        if seconds == 0:
            await self.unload_when_idle(model.name)
        else:
            self._reaper.watch()

    async def close(self) -> None:
        """Shutdown: let loads in progress finish, then unload everything."""
        loop = asyncio.get_running_loop()
        await self._reaper.stop()
        tasks = [p.task for p in self._roster.pending.values() if p.task.get_loop() is loop]
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in list(self._roster.loaded.values()):
            await self._close(model, remember=False)
        self._roster.expired.clear()


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
