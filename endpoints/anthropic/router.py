"""Anthropic Messages routes: thin; mapping and framing live beside them.

The Anthropic SDK appends `/v1/messages` to its base URL, so clients point it
at the server root. Keys come as `x-api-key` (the SDK's header) or a Bearer
token; errors, including auth, rate limits and unknown `/v1/messages/...`
paths, take Anthropic's `{"type": "error", "error": {...}}` shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import Dialect
from common.generation.hooks import GenerationHooks
from common.generation.pipeline import start_generation
from common.models.presets import PresetState
from endpoints.anthropic import serving
from endpoints.anthropic.mapping import build_prompt, message_plan
from endpoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from endpoints.http.auth import require_api
from endpoints.http.deps import RouteDialect, get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.streaming import sse_response, until_disconnect

ANTHROPIC = RouteDialect(Dialect.ANTHROPIC, claims=("/v1/messages",))

router = APIRouter(
    tags=["Anthropic"],
    dependencies=[Depends(ANTHROPIC), Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.ANTHROPIC),
)


@router.post("/v1/messages")
async def messages(
    body: MessagesRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
) -> Response:
    log_unknown_fields(body, "/v1/messages")
    with await lease_model(request, body.model) as lease:
        model = lease.model
        plan = message_plan(body, model, config.model, model.preset(presets.active))
        generation = await start_generation(
            model, plan.prompt, plan.params, hooks=hooks, constraint=plan.constraint,
            default_max_tokens=config.model.default_max_tokens,
        )
        if body.stream:
            frames = serving.message_stream(generation, model.name, plan.options, plan.stop_sequences)
            return sse_response(frames, Dialect.ANTHROPIC, done_marker=False, handles=generation.handles,
                                on_close=lease.detach())
        work = serving.message_response(generation, model.name, plan.options, plan.stop_sequences)
        return JSONResponse(await until_disconnect(request, work, generation.handles))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> JSONResponse:
    """The prompt's length in the model's tokens, after its chat template (tools and system included)."""
    log_unknown_fields(body, "/v1/messages/count_tokens")
    with await lease_model(request, body.model) as lease:
        prompt, *_ = build_prompt(lease.model, body)
        return JSONResponse({"input_tokens": len(prompt.tokens)})
