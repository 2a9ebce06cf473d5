"""What the API routers share: the keyed router a dialect declares, a generating route's dependencies,
starting several generations at once, and answering them (a stream in the dialect's framing, or one JSON
body raced against the client's disconnect)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import Dialect
from common.generation.hooks import GenerationHooks
from common.generation.pipeline import Generation
from common.models.manager import LoadedModel, ModelLease
from common.models.presets import Preset, PresetState
from endpoints.http.auth import require_api
from endpoints.http.deps import RouteDialect, get_config, get_presets, lease_model
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.streaming import ndjson_response, sse_response, until_disconnect


def api_router(declared: RouteDialect, **kw: Any) -> APIRouter:
    """A router whose routes need an API key, parse strict JSON and answer errors in `declared`'s dialect;
    `kw` go to APIRouter (tags, prefix)."""
    return APIRouter(
        dependencies=[Depends(declared), Depends(require_api)],
        route_class=StrictJSONRoute,
        responses=error_responses(declared.dialect),
        **kw,
    )


@dataclass(frozen=True)
class GenerateDeps:
    """What a generating route needs besides its body: `deps: GenerateDeps = Depends(generate_deps)`."""

    request: Request
    config: ParleyConfig
    presets: PresetState
    hooks: GenerationHooks

    async def lease(self, name: str | None) -> ModelLease:
        """`with await deps.lease(body.model) as lease:` (see `lease_model`)."""
        return await lease_model(self.request, name)

    def preset(self, model: LoadedModel) -> Preset | None:
        """The model's sampler preset under the active preset selection."""
        return model.preset(self.presets.active)

    @property
    def default_max_tokens(self) -> int | None:
        return self.config.model.default_max_tokens


def generate_deps(
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
) -> GenerateDeps:
    return GenerateDeps(request, config, presets, hooks)


async def start_each(starts: Iterable[Awaitable[Generation]]) -> list[Generation]:
    """Await each start in turn (pass a generator, so later starts are only made once earlier ones
    succeed); when one fails, or the request is cancelled, cancel those already started."""
    generations: list[Generation] = []
    try:
        for start in starts:
            generations.append(await start)
    except BaseException:
        for g in generations:
            g.cancel()
        raise
    return generations


async def answer(
    request: Request,
    lease: ModelLease,
    generations: Generation | Sequence[Generation],
    *,
    stream: bool,
    frames: Callable[[], AsyncIterator[str]],
    result: Callable[[], Awaitable[Any]],
    dialect: Dialect,
    done_marker: bool = True,
) -> Response:
    """Answer started generations: with `stream`, the `frames()` as SSE (NDJSON for Ollama) whose end
    cancels the generations and releases the lease; else `result()` as one JSON body, cancelled with the
    generations if the client leaves first. `done_marker`: end an SSE stream with `data: [DONE]`."""
    every = [generations] if isinstance(generations, Generation) else list(generations)
    handles = [h for g in every for h in g.handles]
    if stream:
        if dialect is Dialect.OLLAMA:
            return ndjson_response(frames(), handles=handles, on_close=lease.detach())
        return sse_response(frames(), dialect, done_marker=done_marker, handles=handles, on_close=lease.detach())
    return JSONResponse(await until_disconnect(request, result(), handles))
