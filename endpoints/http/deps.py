"""FastAPI dependencies: the per-app objects routers need (read from app.state), and each router's dialect
(recorded in a `DialectRoutes` on app.state as the app includes its routers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from loguru import logger
from pydantic import BaseModel
from starlette.routing import Match

from endpoints.http.auth import Permission, permission_of
from common.config.loader import ParleyConfig
from common.errors import Dialect
from common.downloads.jobs import DownloadManager
from common.models.manager import ModelLease, ModelManager
from common.models.presets import PresetState


def get_models(request: Request) -> ModelManager:
    return request.app.state.models


def get_downloads(request: Request) -> DownloadManager:
    return request.app.state.downloads


async def lease_model(request: Request, name: str | None, *, always_load: bool = False) -> ModelLease:
    """A lease on the model a request names (loading it inline when the config allows).

    Use as `with await lease_model(request, body.model) as lease:`; a streaming
    response takes the release over with `on_close=lease.detach()`.
    """
    models: ModelManager = request.app.state.models
    return await models.acquire(name, admin=await _may_load(request, models), always_load=always_load)


async def lease_embedding_model(
    request: Request, name: str | None, *, always_load: bool = False, task: str = "embed"
) -> ModelLease:
    """A lease on the embedding model an embeddings (`task` embed) or rerank route names (see
    ModelManager.acquire_embedding); use it as `lease_model`'s."""
    models: ModelManager = request.app.state.models
    return await models.acquire_embedding(
        name, admin=await _may_load(request, models), always_load=always_load, task=task
    )


async def _may_load(request: Request, models: ModelManager) -> bool:
    """Whether the request counts as admin for inline loading; its key is looked up only when that matters."""
    return (
        not models.inline_loading or not models.inline_admin_only
        or await permission_of(request) is Permission.ADMIN
    )


def get_presets(request: Request) -> PresetState:
    return request.app.state.presets


def get_config(request: Request) -> ParleyConfig:
    return request.app.state.config


def log_unknown_fields(body: BaseModel, route: str) -> None:
    """Unknown request fields are accepted (clients send many) but noted once per request."""
    extra: dict[str, Any] | None = body.model_extra
    if extra:
        logger.info("{}: ignoring unknown fields {}", route, ", ".join(sorted(extra)))


@dataclass(frozen=True)
class RouteDialect:
    """What a router declares about its routes: `APIRouter(dependencies=[Depends(RouteDialect(...)), ...])`.

    `dialect`: the shape its errors take. `max_tokens`: the request field that
    sets the output length (`max_tokens_named`: how messages name it, when
    that says more). `claims`: path prefixes whose unknown routes still answer
    in this dialect. A route may declare its own after its router's; the last
    one counts. Calling it does nothing: `route_dialect` reads the
    declaration from the matched route, so errors raised before any
    dependency ran (bad JSON, a missing key) take the shape too.
    """

    dialect: Dialect
    max_tokens: str = "max_tokens"
    max_tokens_named: str | None = None
    claims: tuple[str, ...] = ()

    def __call__(self) -> None:
        return None


DEFAULT_DIALECT = RouteDialect(Dialect.OPENAI)  # admin routes, and unknown paths no router claims


def _declared(route: Any) -> RouteDialect | None:
    for dep in reversed(getattr(route, "dependencies", None) or ()):
        if isinstance(dep.dependency, RouteDialect):
            return dep.dependency
    return None


class DialectRoutes:
    """Every API route of an app with the dialect it declares, recorded as routers are included
    (`include`), in the app's order; on app.state.dialects. Built once at app build."""

    def __init__(self) -> None:
        self.routes: list[tuple[Any, RouteDialect | None]] = []

    def include(self, app: Any, router: Any) -> None:
        """`app.include_router(router)`, recording its routes. The router's own entries must be routes
        (include sub-routers at the app, so their routes are recorded too)."""
        for route in router.routes:
            if not isinstance(getattr(route, "path", None), str):
                raise TypeError(
                    f"{route!r} in an included router is not a route: include that sub-router at the app "
                    "with DialectRoutes.include, so its routes' dialects are recorded."
                )
        app.include_router(router)
        self.routes += [(route, _declared(route)) for route in router.routes]

    def match(self, scope: Mapping[str, Any]) -> tuple[Any, RouteDialect | None] | None:
        """The route a request not yet routed will go to (Starlette's rule: a full match, else a partial
        one), with its declaration."""
        partial = None
        for entry in self.routes:
            match, _ = entry[0].matches(scope)
            if match is Match.FULL:
                return entry
            if match is Match.PARTIAL and partial is None:
                partial = entry
        return partial

    def claimant(self, path: str) -> RouteDialect:
        """The declaration claiming the longest prefix of `path`, else OpenAI's."""
        claimant, longest = DEFAULT_DIALECT, 0
        for _, declared in self.routes:
            for prefix in declared.claims if declared else ():
                if path.startswith(prefix) and len(prefix) > longest:
                    claimant, longest = declared, len(prefix)
        return claimant


def include_routers(app: Any, *routers: Any) -> DialectRoutes:
    """Include `routers` in `app` in order, recording their dialects on app.state.dialects."""
    dialects = getattr(app.state, "dialects", None)
    if not isinstance(dialects, DialectRoutes):
        dialects = app.state.dialects = DialectRoutes()
    for router in routers:
        dialects.include(app, router)
    return dialects


def route_dialect(scope: Mapping[str, Any]) -> RouteDialect:
    """The dialect a request answers in: its route's declaration, else that of the router claiming
    the longest prefix of its path, else OpenAI's."""
    route = scope.get("route")
    if isinstance(getattr(route, "path", None), str):  # routed to an endpoint
        return _declared(route) or DEFAULT_DIALECT
    app = scope.get("app")
    dialects = getattr(getattr(app, "state", None), "dialects", None)
    if not isinstance(dialects, DialectRoutes):
        return DEFAULT_DIALECT  # an app not built with include_routers
    if scope.get("type") == "http":
        entry = dialects.match(scope)  # not routed yet (a refused body), or left at an included router
        if entry is not None:
            return entry[1] or DEFAULT_DIALECT
    return dialects.claimant(scope.get("path", ""))


def dialect_at(app: Any, method: str, path: str) -> RouteDialect:
    """The dialect a request to `method path` on `app` answers in (for tests and tools)."""
    return route_dialect({"type": "http", "method": method, "path": path, "root_path": "", "app": app})
