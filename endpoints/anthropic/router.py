"""Anthropic Messages routes: thin; mapping and framing live beside them.

The Anthropic SDK appends `/v1/messages` to its base URL, so clients point it
at the server root. Keys come as `x-api-key` (the SDK's header) or a Bearer
token; errors, including auth, rate limits and unknown `/v1/messages/...`
paths, take Anthropic's `{"type": "error", "error": {...}}` shape.
"""

from __future__ import annotations

from fastapi import Depends, Request
from starlette.responses import JSONResponse, Response

from common.errors import Dialect
from common.generation.pipeline import start_generation
from endpoints.anthropic import serving
from endpoints.anthropic.mapping import build_prompt, message_plan
from endpoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from endpoints.http.deps import RouteDialect, lease_model, log_unknown_fields
from endpoints.http.route import GenerateDeps, answer, api_router, generate_deps

ANTHROPIC = RouteDialect(Dialect.ANTHROPIC, claims=("/v1/messages",))

router = api_router(ANTHROPIC, tags=["Anthropic"])


@router.post("/v1/messages")
async def messages(body: MessagesRequest, deps: GenerateDeps = Depends(generate_deps)) -> Response:
    log_unknown_fields(body, "/v1/messages")
    with await deps.lease(body.model) as lease:
        model = lease.model
        plan = message_plan(body, model, deps.config.model, deps.preset(model))
        generation = await start_generation(
            model, plan.prompt, plan.params, hooks=deps.hooks, constraint=plan.constraint,
            default_max_tokens=deps.default_max_tokens,
        )
        return await answer(
            deps.request, lease, generation, stream=body.stream, dialect=Dialect.ANTHROPIC, done_marker=False,
            frames=lambda: serving.message_stream(generation, model.name, plan.options, plan.stop_sequences),
            result=lambda: serving.message_response(generation, model.name, plan.options, plan.stop_sequences),
        )


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> JSONResponse:
    """The prompt's length in the model's tokens, after its chat template (tools and system included)."""
    log_unknown_fields(body, "/v1/messages/count_tokens")
    with await lease_model(request, body.model) as lease:
        prompt, *_ = build_prompt(lease.model, body)
        return JSONResponse({"input_tokens": len(prompt.tokens)})
