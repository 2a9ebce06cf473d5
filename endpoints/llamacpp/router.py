"""llama.cpp server routes: /completion (/completions), /slots, /infill, /tokenize, /detokenize; thin.

Front-ends set to "llama.cpp" (SillyTavern's text completion, llama.cpp's own
web UI) and editors' code-completion plugins (llama.vim, llama.vscode) call
these. Bodies and answers keep llama.cpp's field names; mapping and framing
live beside this file; errors take llama-server's envelope
`{"error": {"code": <status>, "message", "type"}}` (with `param` added).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Query, Request
from starlette.responses import Response

from common.errors import APIError, BadRequestError, Dialect, ServiceUnavailableError
from common.generation.pipeline import start_generation
from common.models.manager import ModelManager
from common.models.presets import PresetState
from endpoints.http.deps import RouteDialect, get_models, get_presets, lease_model, log_unknown_fields
from endpoints.http.route import GenerateDeps, answer, api_router, generate_deps, start_each
from endpoints.llamacpp import completion_serving, serving
from endpoints.llamacpp.completion_mapping import completion_plan, default_params
from endpoints.llamacpp.completion_protocol import LlamaCompletionRequest
from endpoints.llamacpp.mapping import infill_plan
from endpoints.llamacpp.protocol import DetokenizeRequest, InfillRequest, TokenizeRequest

LLAMACPP = RouteDialect(Dialect.LLAMACPP, max_tokens="n_predict")

router = api_router(LLAMACPP, tags=["llama.cpp"])


@router.post("/completion")
@router.post("/completions")
async def completion(body: LlamaCompletionRequest, deps: GenerateDeps = Depends(generate_deps)) -> Response:
    """llama.cpp's text completion: a prompt (text, token ids or both) and llama-server's sampler fields."""
    log_unknown_fields(body, deps.request.url.path)
    with await deps.lease(body.model) as lease:
        model = lease.model
        plan = completion_plan(body, model, deps.preset(model), default_max_tokens=deps.default_max_tokens)
        generations = await start_each(
            start_generation(
                model, prompt, plan.params, hooks=deps.hooks, n=plan.n, constraint=plan.constraint,
                default_max_tokens=plan.default_max_tokens,
            )
            for prompt in plan.prompts
        )
        return await answer(
            deps.request, lease, generations, stream=bool(body.stream), dialect=Dialect.LLAMACPP, done_marker=False,
            frames=lambda: completion_serving.completion_stream(model, generations[0], plan),
            result=lambda: completion_serving.completion_response(model, generations, plan),
        )


@router.get("/slots")
async def slots(
    model: str | None = Query(None, description="A loaded model's name; none: the default model."),
    fail_on_no_slot: bool = Query(False, description="Answer 503 when every slot is busy."),
    models: ModelManager = Depends(get_models),
    presets: PresetState = Depends(get_presets),
) -> list[dict[str, Any]]:
    """llama.cpp's slot list, from the engine's slot counters (no prompt text is ever shown)."""
    loaded = models.get(model)
    stats = loaded.engine.stats()
    if fail_on_no_slot and stats.slots_active >= stats.slots_total:
        raise ServiceUnavailableError("Every slot is busy; retry shortly.", retry_after=1)
    return completion_serving.slots_body(loaded, default_params(loaded.preset(presets.active)))


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: int, action: str | None = None) -> None:
    """llama.cpp's slot save/restore/erase: not offered, Parley manages its prompt cache itself."""
    err = APIError(
        f"Slot actions ({action or 'none given'} on slot {id_slot}) are not supported: Parley reuses cached "
        "prompt prefixes by itself. Send requests as usual; the cache needs no saving or erasing.",
        status=501, code="not_supported",
    )
    err.type = "not_supported_error"  # llama-server's type for a feature it does not offer
    raise err


@router.post("/infill")
async def infill(body: InfillRequest, deps: GenerateDeps = Depends(generate_deps)) -> Response:
    """llama.cpp's code completion: the text between input_prefix and input_suffix."""
    log_unknown_fields(body, "/infill")
    with await deps.lease(body.model) as lease:
        model = lease.model
        prompt, params = infill_plan(body, model, deps.preset(model))
        generation = await start_generation(model, prompt, params, hooks=deps.hooks,
                                            default_max_tokens=deps.default_max_tokens)
        return await answer(
            deps.request, lease, generation, stream=body.stream, dialect=Dialect.LLAMACPP, done_marker=False,
            frames=lambda: serving.infill_stream(model, generation),
            result=lambda: serving.infill_response(model, generation),
        )


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
