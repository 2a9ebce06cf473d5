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

from backends.base import LoadOptions
from common.auth import AuthManager
from common.config import ParleyConfig
from common.errors import APIError, BadRequestError, Dialect, EngineError, dialect_for_path
from common.models import ModelManager
from common.presets import PresetState

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"


def load_options_from(config: ParleyConfig) -> LoadOptions:
    m = config.model
    return LoadOptions(
        max_seq_len=m.max_seq_len,
        cache_size=m.cache_size,
        max_batch_size=m.max_batch_size,
        chunk_size=m.chunk_size,
        max_queue=m.max_queue,
        n_threads=m.n_threads,
        n_gpu_layers=m.n_gpu_layers,
        cache_mode=m.cache_mode,
        flash_attention=m.flash_attention,
        prompt_template=m.prompt_template,
    )


def build_model_manager(config: ParleyConfig) -> ModelManager:
    m = config.model
    return ModelManager(
        Path(m.model_dir),
        PROJECT_ROOT / "templates",
        load_options_from(config),
        backend=m.backend,
        dummy_names=tuple(m.dummy_model_names) if m.use_dummy_models else (),
        max_loaded=m.max_loaded_models,
    )


async def load_startup_model(app: FastAPI) -> None:
    """Load the configured model (or the first one found) without blocking the server."""
    config: ParleyConfig = app.state.config
    models: ModelManager = app.state.models
    name = config.model.model_name
    if not name:
        found = models.available()
        if not found:
            logger.warning(
                "No model in '{}'. Put a GGUF there, run `python main.py download REPO`, or POST /v1/model/load.",
                config.model.model_dir,
            )
            return
        name = found[0].name
    try:
        await models.load(name)
    except APIError as exc:
        logger.error("Could not load '{}': {}", name, exc.message)
    except Exception:
        logger.exception("Could not load '{}'", name)


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
        dialect = dialect_for_path(request.url.path)
        return JSONResponse(err.body(dialect), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        err = BadRequestError(message, param=param)
        if dialect_for_path(request.url.path) is Dialect.KOBOLD:
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


def create_app(config: ParleyConfig, *, load_model_on_startup: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
            await app.state.models.close()

    app = FastAPI(title="Parley", version=VERSION, lifespan=lifespan)
    app.state.config = config
    app.state.auth = AuthManager.load(config.network.api_tokens_file, disabled=config.network.disable_auth)
    app.state.models = build_model_manager(config)
    app.state.presets = PresetState(PROJECT_ROOT / "sampler_overrides")
    if config.sampling.override_preset:
        try:
            app.state.presets.switch(config.sampling.override_preset)
        except APIError as exc:
            raise SystemExit(f"sampling.override_preset: {exc.message}") from None
    install_error_handlers(app)
    if config.network.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.network.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    from endpoints.core.router import router as core_router
    from endpoints.kobold.router import router as kobold_router
    from endpoints.ollama.router import router as ollama_router
    from endpoints.openai.router import router as openai_router

    servers = set(config.network.api_servers)
    app.include_router(core_router)
    if "openai" in servers:
        from endpoints.core.llamacpp_router import router as llamacpp_router

        app.include_router(openai_router)
        app.include_router(llamacpp_router)
    if "ollama" in servers:
        app.include_router(ollama_router)
    if "kobold" in servers:
        app.include_router(kobold_router)
    return app
