"""llama.cpp server routes: /infill, /tokenize, /detokenize; thin, mapping and framing live beside them.

Editors' code-completion plugins written for llama.cpp's server (llama.vim,
llama.vscode, ...) call these. Bodies and answers keep llama.cpp's field
names; errors use the OpenAI envelope, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.hooks import GenerationHooks
from common.generation.pipeline import start_generation
from common.models.presets import PresetState
from endpoints.http.auth import require_api
from endpoints.http.deps import RouteDialect, get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.streaming import sse_response, until_disconnect
from endpoints.llamacpp import serving
from endpoints.llamacpp.mapping import infill_plan
from endpoints.llamacpp.protocol import DetokenizeRequest, InfillRequest, TokenizeRequest

LLAMACPP = RouteDialect(Dialect.OPENAI, max_tokens="n_predict")  # llama.cpp's server answers in OpenAI's shape

router = APIRouter(
    tags=["llama.cpp"],
    dependencies=[Depends(LLAMACPP), Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


@router.post("/infill")
async def infill(
    body: InfillRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
) -> Response:
    """llama.cpp's code completion: the text between input_prefix and input_suffix."""
    log_unknown_fields(body, "/infill")
    with await lease_model(request, body.model) as lease:
        model = lease.model
        prompt, params = infill_plan(body, model, model.preset(presets.active))
        generation = await start_generation(model, prompt, params, hooks=hooks,
                                            default_max_tokens=config.model.default_max_tokens)
        if body.stream:
            return sse_response(serving.infill_stream(model, generation), Dialect.OPENAI,
                                done_marker=False, handles=generation.handles, on_close=lease.detach())
        result = await until_disconnect(request, serving.infill_response(model, generation), generation.handles)
        return JSONResponse(result)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of `content`; with_pieces pairs each id with its text (or its bytes when not UTF-8)."""
    log_unknown_fields(body, "/tokenize")
    with await lease_model(request, body.model) as lease:
        return serving.tokenize_body(body, lease.model)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text of token ids (special tokens included, as llama.cpp renders them)."""
    log_unknown_fields(body, "/detokenize")
    with await lease_model(request, body.model) as lease:
        model = lease.model
        n_vocab = model.info.n_vocab
        bad = next((t for t in body.tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise BadRequestError(
                f"Token id {bad} is outside the vocabulary (0..{n_vocab - 1}); send ids from /tokenize.",
                param="tokens",
            )
        return {"content": model.engine.detokenize(body.tokens, special=True)}
