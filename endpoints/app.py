"""create_app(config): routers, error rendering per dialect, lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from endpoints.http.auth import AuthManager
from common.config.loader import ConfigError, ParleyConfig
from common.downloads.jobs import DownloadManager
from common.errors import APIError, BadRequestError, Dialect, EngineError
from endpoints.http.lifecycle import Lifecycle
from endpoints.http.metrics import Metrics
from common.models.manager import ModelManager
from common.models.options import LoraPolicy, ManagerSettings
from common.models.remote import check_reachable, open_remote, remote_specs, templates_of
from backends.remote.spec import RemoteSpec
from common.models.presets import PresetState
from endpoints.http.limit_store import build_limit_store
from endpoints.http.deps import include_routers, route_dialect
from endpoints.http.request_context import Services
from endpoints.http.middleware import ParleyMiddleware
from endpoints.http.store import StoreHolder
from endpoints.assistants.execution import RunTasks

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"


def build_model_manager(config: ParleyConfig, metrics: Metrics | None = None) -> ModelManager:
    """The model manager the config describes: loads reported to the metrics, `lora.loras` applied
    to each load of the configured model. An unusable draft_model setting stops the server."""
    try:
        settings = ManagerSettings.from_config(config, PROJECT_ROOT)
    except ConfigError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None
    on_loaded = metrics.model_loaded if metrics is not None else None
    return ModelManager(settings, on_loaded=on_loaded, prepare=LoraPolicy.from_config(config).apply)


async def load_startup_model(app: FastAPI) -> None:
    """Load the configured model (or the first one found) without blocking the server."""
    config: ParleyConfig = app.state.config
    models: ModelManager = app.state.models
    name = config.model.model_name
    embedding_name = config.embeddings.embedding_model_name
    if embedding_name:
        await _load_or_log(models, embedding_name, "the embedding model ")
    if not name:
        found = [m for m in models.available() if models.task_of(m) == "generate"]
        if not found:
            logger.warning(
                "No model in '{}'. Put a GGUF there, run `python main.py download REPO`, or POST /v1/model/load.",
                config.model.model_dir,
            )
            return
        name = found[0].name
    await _load_or_log(models, name)


async def _load_or_log(models: ModelManager, name: str, what: str = "") -> None:
    """Load a model at start-up; a failure is logged and the server starts without it."""
    try:
        await models.load(name)
    except APIError as exc:
        logger.error("Could not load {}'{}': {}", what, name, exc.message)
    except Exception:
        logger.exception("Could not load {}'{}'", what, name)


def remote_models_of(config: ParleyConfig, *, check: bool) -> list[RemoteSpec]:
    """The remote models the config declares; a bad one (or, with `check`, an unreachable replica)
    stops the server with a message naming the key."""
    try:
        specs = remote_specs(config)
        if check:
            check_reachable(specs, config)
    except ConfigError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None
    return specs


async def open_remote_models(app: FastAPI, specs: list[RemoteSpec]) -> None:
    models: ModelManager = app.state.models
    templates = templates_of(app.state.config) if specs else {}
    for spec in specs:
        model = await open_remote(spec, models.template_by_name(templates.get(spec.name)))
        models.register(model)
        logger.info("Remote model {} ({} {}, {} replica(s), routing {})", spec.name, spec.kind, spec.server,
                    len(spec.replicas), spec.routing)


def _param_of(loc: list[str | int]) -> str | None:
    """A pydantic location as clients write it: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param: str | None = None
    for err in exc.errors():
        param = _param_of([x for x in err.get("loc", ()) if x != "body"])
        if param is None and tuple(err.get("loc", ())) == ("body",):
            param = "body"
        first_param = first_param or param
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        parts.append(f"{param}: {msg}" if param else msg)
    return "Invalid request: " + "; ".join(parts[:5]) + ". Fix the field and retry.", first_param


def install_error_handlers(app: FastAPI) -> None:
    def render(request: Request, err: APIError) -> JSONResponse:
        dialect = route_dialect(request.scope).dialect
        return JSONResponse(err.body(dialect), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        err = BadRequestError(message, param=param)
        if route_dialect(request.scope).dialect is Dialect.KOBOLD:
            err.status = 422
        return render(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}. See the README for the endpoints."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        err = APIError(message, status=exc.status_code, code="not_found" if exc.status_code == 404 else "http_error")
        err.type = "invalid_request_error"
        return render(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error("Unhandled error on {} {}", request.method, request.url.path)
        debug = app.state.config.developer.debug_errors
        detail = f": {exc!r}" if debug else ""
        return render(request, EngineError(f"Internal server error{detail}. The server keeps running; retry."))


def install_services(app: FastAPI, config: ParleyConfig, metrics: Metrics | None) -> None:
    """Rate limits, metrics and the shutdown state on app.state.services; the middleware using them; CORS."""
    lifecycle = Lifecycle(config.network.shutdown_timeout)
    limits = config.limits
    services = Services(config, build_limit_store(limits.store, fail_open=limits.store_fail_open), lifecycle, metrics)
    app.state.services = services
    app.state.lifecycle = lifecycle
    models: ModelManager = app.state.models
    if metrics is not None:
        metrics.watch(
            lambda: {name: m.engine for name, m in models.loaded.items()},
            lambda: lifecycle.in_flight,
            lambda: lifecycle.draining,
        )
    app.add_middleware(ParleyMiddleware, services=services)
    # Added last, so it is outermost: refusals (413, 429, 503) carry CORS headers too.
    if config.network.cors_origins:
        origins = config.network.cors_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
        logger.info("CORS: browsers may call this server from {}", "any origin" if "*" in origins else origins)


def create_app(config: ParleyConfig, *, load_model_on_startup: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store.start()
        await open_remote_models(app, remote)
        app.state.startup_load = (
            asyncio.create_task(load_startup_model(app)) if load_model_on_startup else None
        )
        try:
            yield
        finally:
            task = app.state.startup_load
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await app.state.downloads.close()
            await app.state.run_tasks.close()
            await app.state.store.close()
            await app.state.models.close()
            await app.state.services.limiter.close()

    app = FastAPI(title="Parley", version=VERSION, lifespan=lifespan)
    app.state.config = config
    app.state.auth = AuthManager.load(config.network.api_tokens_file, disabled=config.network.disable_auth)
    metrics = Metrics() if config.network.enable_metrics else None
    app.state.models = build_model_manager(config, metrics)
    remote = remote_models_of(config, check=load_model_on_startup)
    app.state.downloads = DownloadManager(Path(config.model.model_dir), config.model.hf_endpoint)
    app.state.presets = PresetState(PROJECT_ROOT / "sampler_overrides")
    app.state.store = StoreHolder(config)
    app.state.run_tasks = RunTasks()
    if config.sampling.override_preset:
        try:
            app.state.presets.switch(config.sampling.override_preset)
        except APIError as exc:
            raise SystemExit(f"sampling.override_preset: {exc.message}") from None
    install_error_handlers(app)
    install_services(app, config, metrics)

    from endpoints.core.download_router import router as download_router
    from endpoints.core.embedding_router import router as embedding_admin_router
    from endpoints.core.lora_router import router as lora_router
    from endpoints.core.router import router as core_router
    from endpoints.kobold.router import router as kobold_router
    from endpoints.ollama.router import routers as ollama_routers
    from endpoints.openai.router import router as openai_router

    servers = set(config.network.api_servers)
    # include_routers records each route's dialect on app.state.dialects (route_dialect reads it).
    include_routers(app, core_router)
    include_routers(app, download_router)
    include_routers(app, lora_router)
    include_routers(app, embedding_admin_router)
    if config.network.enable_metrics:
        from endpoints.core.metrics_router import router as metrics_router

        include_routers(app, metrics_router)
    if "openai" in servers:
        from endpoints.llamacpp.router import router as llamacpp_router

        from endpoints.assistants.router import router as assistants_router
        from endpoints.assistants.runs import router as runs_router
        from endpoints.responses.conversations import router as conversations_router
        from endpoints.responses.router import router as responses_router
        from endpoints.llamacpp.embedding_router import router as llamacpp_embedding_router
        from endpoints.openai.embedding_router import router as openai_embedding_router

        include_routers(app, openai_router)
        include_routers(app, openai_embedding_router)
        include_routers(app, llamacpp_router)
        include_routers(app, responses_router)
        include_routers(app, conversations_router)
        include_routers(app, runs_router)  # before assistants_router: POST /v1/threads/runs is not a thread id
        include_routers(app, assistants_router)
        include_routers(app, llamacpp_embedding_router)
    if "ollama" in servers:
        include_routers(app, *ollama_routers)
    if "kobold" in servers:
        include_routers(app, kobold_router)
    if "anthropic" in servers:
        from endpoints.anthropic.router import router as anthropic_router

        include_routers(app, anthropic_router)
    return app
