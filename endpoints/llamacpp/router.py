"""llama.cpp server routes: /infill, /tokenize, /detokenize.

Editors' code-completion plugins written for llama.cpp's server (llama.vim,
llama.vscode, ...) call these. Bodies and answers keep llama.cpp's field
names; errors use the OpenAI envelope, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from backends.base import Finished, FinishReason, GenerationHandle, TextDelta
from endpoints.http.auth import require_api
from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.fim import fim_prompt
from common.generation.pipeline import (
    Prompt,
    collect,
    fit_params,
    raise_if_failed,
    submit_choices,
)
from common.models.manager import LoadedModel
from common.models.presets import Preset, PresetState, build_params
from backends.sampling import SamplingParams
from endpoints.http.streaming import dumps, sse_response, until_disconnect
from endpoints.http.deps import get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.names import ModelName
from endpoints.openai.serving import stream_failure
from endpoints.http.wire import WireModel

router = APIRouter(
    tags=["llama.cpp"],
    dependencies=[Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)

# llama.cpp server's sampling defaults, for clients that send none.
LLAMACPP_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


class InfillRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    input_prefix: str = ""
    input_suffix: str = ""
    prompt: str = Field("", description="Text the completion starts with, placed after the middle token.")
    model: ModelName | None = None
    n_predict: int = Field(-1, ge=-1, description="Most tokens to generate; -1 = until the context is full.")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, description="-1 = random.")
    stop: list[str] | str | None = None
    stream: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    model: ModelName | None = None


class DetokenizeRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[int]
    model: ModelName | None = None


def infill_params(body: InfillRequest, preset: Preset | None) -> SamplingParams:
    """llama.cpp fields -> SamplingParams: llama.cpp defaults < preset < sent < forced."""
    if body.n_predict == 0:
        raise BadRequestError(
            "'n_predict' 0 would generate nothing; send -1 for no limit or a positive token count.",
            param="n_predict",
        )
    sent: dict[str, Any] = {
        name: value
        for name in ("temperature", "top_k", "top_p", "min_p")
        if (value := getattr(body, name)) is not None
    }
    if body.n_predict > 0:
        sent["max_tokens"] = body.n_predict
    if body.seed is not None and body.seed >= 0:
        sent["seed"] = body.seed
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        sent["stop"] = tuple(s for s in stops if s)
    return build_params(sent, preset, LLAMACPP_DEFAULTS)


def stop_type(finish: Finished) -> str:
    if finish.reason is FinishReason.LENGTH:
        return "limit"
    if finish.reason is FinishReason.STOP:
        return "word" if finish.stop_string else "eos"
    return "none"


def _timings(finish: Finished) -> dict[str, Any]:
    u = finish.usage
    prompt_ms, predicted_ms = u.prompt_seconds * 1000, u.generation_seconds * 1000
    return {
        "prompt_n": u.prompt_tokens - u.cached_tokens,
        "prompt_ms": prompt_ms,
        "prompt_per_second": (u.prompt_tokens - u.cached_tokens) / u.prompt_seconds if u.prompt_seconds else 0.0,
        "predicted_n": u.completion_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / u.completion_tokens if u.completion_tokens else 0.0,
        "predicted_per_second": u.completion_tokens / u.generation_seconds if u.generation_seconds else 0.0,
        "draft_n": u.draft_tokens,
        "draft_n_accepted": u.accepted_draft_tokens,
    }


def final_body(model: LoadedModel, prompt: Prompt, params: SamplingParams, finish: Finished, content: str,
               tokens: list[int]) -> dict[str, Any]:
    """llama.cpp's last answer object (the whole answer when not streaming)."""
    return {
        "index": 0,
        "content": content,
        "tokens": tokens,
        "id_slot": 0,
        "stop": True,
        "model": model.name,
        "tokens_predicted": finish.usage.completion_tokens,
        "tokens_evaluated": finish.usage.prompt_tokens or len(prompt.tokens),
        "tokens_cached": finish.usage.cached_tokens,
        "truncated": False,
        "stop_type": stop_type(finish),
        "stopping_word": finish.stop_string or "",
        "generation_settings": {
            "n_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "seed": params.seed if params.seed is not None else -1,
            "stop": list(params.stop),
        },
        "timings": _timings(finish),
    }


async def infill_response(
    model: LoadedModel, prompt: Prompt, params: SamplingParams, handle: GenerationHandle
) -> dict[str, Any]:
    (result,) = await collect([handle])
    raise_if_failed(result.finish)
    assert result.finish is not None
    return final_body(model, prompt, params, result.finish, result.text, result.token_ids)


async def infill_stream(
    model: LoadedModel, prompt: Prompt, params: SamplingParams, handle: GenerationHandle
) -> AsyncIterator[str]:
    predicted = 0
    async with aclosing(handle.events()) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                predicted += len(ev.token_ids)
                if ev.text:
                    frame = {"index": 0, "content": ev.text, "tokens": list(ev.token_ids), "stop": False,
                             "id_slot": -1, "tokens_predicted": predicted, "tokens_evaluated": len(prompt.tokens)}
                    yield f"data: {dumps(frame)}\n\n"
                continue
            failure = stream_failure(ev)
            if failure is not None:
                raise failure
            yield f"data: {dumps(final_body(model, prompt, params, ev, '', []))}\n\n"


@router.post("/infill")
async def infill(
    body: InfillRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
) -> Response:
    """llama.cpp's code completion: the text between input_prefix and input_suffix."""
    log_unknown_fields(body, "/infill")
    with await lease_model(request, body.model) as lease:
        model = lease.model
        requested = infill_params(body, model.preset(presets.active))  # the request's own mistakes first
        prompt = fim_prompt(model, body.input_prefix, body.input_suffix, middle=body.prompt, param="input_suffix")
        params = fit_params(model, prompt, requested, config.model.default_max_tokens)
        (handle,) = submit_choices(model, prompt, params, 1)
        if body.stream:
            return sse_response(infill_stream(model, prompt, params, handle), Dialect.OPENAI,
                                done_marker=False, handles=[handle], on_close=lease.detach())
        result = await until_disconnect(request, infill_response(model, prompt, params, handle), [handle])
        return JSONResponse(result)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of `content`; with_pieces pairs each id with its text (or its bytes when not UTF-8)."""
    log_unknown_fields(body, "/tokenize")
    with await lease_model(request, body.model) as lease:
        return _tokenize(body, lease.model)


def _tokenize(body: TokenizeRequest, model: LoadedModel) -> dict[str, Any]:
    add_bos = body.add_special and model.info.add_bos_token
    tokens = model.engine.tokenize(body.content, add_bos=add_bos, special=body.parse_special)
    if not body.with_pieces:
        return {"tokens": tokens}
    out: list[dict[str, Any]] = []
    for t in tokens:
        raw = model.engine.token_piece(t)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return {"tokens": out}


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
