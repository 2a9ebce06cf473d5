"""Which model a name means: the README's "Several models" rules over the manager's roster.

The `Roster` is the ModelManager's bookkeeping: the models loaded, loading and unloaded for
idleness, and the default one. Its methods only read it and decide, raising the error a client
gets when a name cannot be served; the manager alone changes it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from backends.base import LoadOptions
from common.errors import BadRequestError, ModelNotFoundError, ModelNotLoadedError, PermissionDeniedError
from common.models.catalog import ModelCatalog
from common.models.files import strip_gguf
from common.models.loaded import LoadedModel
from common.models.options import ManagerSettings

DEFAULT_NAMES = ("", "default")


@dataclass
class PendingLoad:
    task: asyncio.Task[LoadedModel]
    waiters: int = 0  # requests that get a lease on the result


@dataclass
class Roster:
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    pending: dict[str, PendingLoad] = field(default_factory=dict)
    # Unloaded for idleness: reloaded on demand with these options and backend.
    expired: dict[str, tuple[LoadOptions, str | None]] = field(default_factory=dict)
    default_name: str | None = None  # the first model loaded (the startup model)
    default_embedding: str | None = None  # the first embedding model loaded

    def chat_models(self) -> list[LoadedModel]:
        return [m for m in self.loaded.values() if not m.is_embedding]

    def find_loaded(self, name: str) -> LoadedModel | None:
        return self.loaded.get(name) or self.loaded.get(strip_gguf(name))

    def idle_unloaded(self) -> list[str]:
        return [n for n in self.expired if n not in self.loaded and n not in self.pending]

    def loaded_names(self) -> str:
        return ", ".join(self.loaded) or "none"

    def default(self) -> LoadedModel | str | None:
        """The default model: the first one loaded while it is loaded or coming back (a name to wait
        for or reload), else any loaded model."""
        name = self.default_name
        if name in self.loaded:
            return self.loaded[name]
        if name is not None and (name in self.pending or name in self.expired):
            return name
        return next(iter(self.chat_models()), None)

    def nothing_loaded(self, coming: str | None = None) -> ModelNotLoadedError:
        if coming in self.expired:
            return ModelNotLoadedError(
                f"Model '{coming}' was unloaded after being idle (keep_alive); a generation request loads it "
                "again. Retry with one.",
            )
        if self.pending:
            return ModelNotLoadedError("The model is still loading. Retry in a moment.")
        return ModelNotLoadedError(
            "No model is loaded. Load one with POST /v1/model/load (admin key) and retry."
        )

    def get(self, name: str | None, settings: ManagerSettings) -> LoadedModel:
        """A loaded model by name (no name, "default" or a dummy name: the default model); never loads."""
        if name and name not in DEFAULT_NAMES and name not in settings.dummy_names:
            model = self.find_loaded(name)
            if model is None:
                if len(self.chat_models()) == 1 and not settings.inline_loading:
                    return self.chat_models()[0]  # single-model servers answer any name
                raise ModelNotFoundError(
                    f"Model '{name}' is not loaded. Loaded: {self.loaded_names()}. "
                    "Name a loaded model, or load it with POST /v1/model/load (admin key).",
                    param="model",
                )
            return model
        target = self.default()
        if isinstance(target, LoadedModel):
            return target
        raise self.nothing_loaded(target)

    def plan(
        self, name: str | None, settings: ManagerSettings, catalog: ModelCatalog, *, admin: bool, always_load: bool
    ) -> LoadedModel | str:
        """The loaded model a request gets now, or the name of the model to load (or wait for) first."""
        if not name or name in DEFAULT_NAMES or name in settings.dummy_names:
            target = self.default()
            if target is None:
                raise self.nothing_loaded()
            return target
        for candidate in (name, strip_gguf(name)):
            if candidate in self.loaded:
                return self.loaded[candidate]
            if candidate in self.pending:
                return candidate
        entry = catalog.find_quiet(name)
        if entry is not None and catalog.task_of(entry) != "generate" and entry.name not in self.expired:
            raise BadRequestError(
                f"'{entry.name}' is an embedding model: it cannot generate text. Name a chat model in `model`, "
                "or send this text to /v1/embeddings.", param="model",
            )
        if entry is not None and (always_load or entry.name in self.expired):
            return entry.name
        if always_load or settings.inline_loading:
            if entry is None:
                catalog.find(name)  # raises 404 listing the available models
            assert entry is not None
            if settings.inline_admin_only and not admin:
                raise PermissionDeniedError(
                    f"Model '{entry.name}' is not loaded, and loading it from a request needs the admin key "
                    f"(inline_model_loading_admin_only). Loaded: {self.loaded_names()}. "
                    "Use a loaded model, send the admin key, or ask an admin to POST /v1/model/load.",
                )
            return entry.name
        if len(self.chat_models()) == 1:
            return self.chat_models()[0]  # single-model servers answer any name
        if not self.chat_models():
            raise self.nothing_loaded()
        where = "is in the model directory but not loaded" if entry else "is neither loaded nor in the model directory"
        raise ModelNotFoundError(
            f"Model '{name}' {where}. Loaded: {self.loaded_names()}. Name a loaded model, or load it "
            "with POST /v1/model/load (admin key); inline_model_loading: true loads models on request.",
            param="model",
        )

    # -- embedding routes ------------------------------------------------------------
    def plan_embedding(
        self, name: str | None, settings: ManagerSettings, catalog: ModelCatalog, *, admin: bool, always_load: bool,
        task: str = "embed",
    ) -> LoadedModel | str:
        """The embedding model an embeddings or rerank route gets, or the name of one to load first.

        A loaded or listed embedding model by its name (listed ones load when `always_load`, inline loading
        or keep_alive allow); a chat model's name is a 400; no name, `default`, a dummy or any other name
        (clients send `text-embedding-3-small`) means the default embedding model, preferring one whose
        `task` (embed, rerank) fits."""
        if name and name not in DEFAULT_NAMES and name not in settings.dummy_names:
            for candidate in (name, strip_gguf(name)):
                model = self.loaded.get(candidate)
                if model is not None:
                    if not model.is_embedding:
                        raise self.not_embedding(candidate)
                    return model
            entry = catalog.find_quiet(name)
            if entry is not None:
                if catalog.task_of(entry) == "generate":
                    raise self.not_embedding(entry.name)
                if entry.name in self.pending or entry.name in self.expired or always_load:
                    return entry.name
                if settings.inline_loading:
                    if settings.inline_admin_only and not admin:
                        raise PermissionDeniedError(
                            f"Embedding model '{entry.name}' is not loaded, and loading it from a request needs the "
                            "admin key. Ask an admin to POST /v1/model/embedding/load, or send the admin key.",
                        )
                    return entry.name
                raise ModelNotFoundError(
                    f"Embedding model '{entry.name}' is in the model directory but not loaded. Load it with "
                    "POST /v1/model/embedding/load (admin key), or leave `model` out to use the loaded one.",
                    param="model",
                )
        target = self.default_embedding_model(task)
        if target is None:
            raise BadRequestError(
                "No embedding model is loaded. Name one from GET /v1/model/embedding/list in `model`, load one with "
                "POST /v1/model/embedding/load (admin key), or set embeddings.embedding_model_name in config.yml.",
                param="model", code="no_embedding_model",
            )
        return target

    def default_embedding_model(self, task: str) -> LoadedModel | str | None:
        loaded = [m for m in self.loaded.values() if m.is_embedding]
        fitting = [m for m in loaded if getattr(m.engine, "task", "embed") == task]
        name = self.default_embedding
        if name in self.loaded and (self.loaded[name] in fitting or not fitting):
            return self.loaded[name]
        if fitting:
            return fitting[0]
        if name is not None and (name in self.pending or name in self.expired):
            return name
        return loaded[0] if loaded else None

    def not_embedding(self, name: str) -> BadRequestError:
        names = ", ".join(m.name for m in self.loaded.values() if m.is_embedding) or "none loaded"
        return BadRequestError(
            f"model '{name}' does not support embeddings: it generates text. Name an embedding model ({names}) or "
            "leave `model` out, and load one with POST /v1/model/embedding/load if needed.",
            param="model",
        )
