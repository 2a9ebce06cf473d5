"""Responses routes: POST /v1/responses, GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.hooks import GenerationHooks
from common.generation.pipeline import start_generation
from common.models.presets import PresetState
from common.store.ids import new_id
from common.store.store import Owner, Store
from endpoints.http.auth import require_api
from endpoints.http.deps import RouteDialect, get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute
from endpoints.http.request_context import request_hooks
from endpoints.http.store import get_store, owner_of
from endpoints.http.streaming import sse_response, until_disconnect
from endpoints.openai.protocol import lora_pairs
from endpoints.responses import serving
from endpoints.responses.items import input_items, to_messages
from endpoints.responses.mapping import responses_params, responses_plan
from endpoints.responses.output import OutputBuilder
from endpoints.responses.protocol import ResponsesRequest

RESPONSES = RouteDialect(Dialect.OPENAI, max_tokens="max_output_tokens")

router = APIRouter(
    tags=["OpenAI Responses"],
    dependencies=[Depends(RESPONSES), Depends(require_api)],
    route_class=StrictJSONRoute,
    responses=error_responses(Dialect.OPENAI),
)


def conversation_id(value: str | dict[str, Any] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value.get("id"), str):
        return value["id"]
    raise BadRequestError("conversation must be a conversation id or {'id': ...}.", param="conversation")


@router.post("/v1/responses")
async def create_response(
    body: ResponsesRequest,
    request: Request,
    config: ParleyConfig = Depends(get_config),
    presets: PresetState = Depends(get_presets),
    hooks: GenerationHooks = Depends(request_hooks),
    store: Store = Depends(get_store),
    owner: Owner = Depends(owner_of),
) -> Response:
    log_unknown_fields(body, "/v1/responses")
    items = input_items(body.input) if body.input is not None else []
    conv_id = conversation_id(body.conversation)
    context: list[dict[str, Any]] = []
    if conv_id and body.previous_response_id:
        raise BadRequestError("Send either previous_response_id or conversation, not both.", param="conversation")
    if body.previous_response_id:
        context = await serving.stored_context(store, owner, body.previous_response_id)
    if conv_id:
        await store.get("conversation", conv_id, owner, param="conversation")
        held = await store.count_children(conv_id, "item")
        if held + len(items) + 8 > config.store.max_thread_messages:
            raise BadRequestError(
                f"Conversation {conv_id} holds {held} items, and store.max_thread_messages is "
                f"{config.store.max_thread_messages}. Start a new conversation.", param="conversation",
            )
        context = [r.data for r in await store.children(conv_id, "item")]
    messages = to_messages(context + items, body.instructions)
    with await lease_model(request, body.model) as lease:
        model = lease.model
        chat, plan = responses_plan(body, messages, model, config.model, model.preset(presets.active))
        with responses_params():
            generation = await start_generation(
                model, plan.prompt, plan.params, hooks=hooks, constraint=plan.constraint,
                loras=lora_pairs(chat.loras), default_max_tokens=config.model.default_max_tokens,
            )
        resp_id = new_id("resp")
        response = serving.new_response(body, resp_id, model.name, plan.params, conv_id)

        async def finish(done: dict[str, Any]) -> None:
            if body.store:
                await store.add("response", owner, {"response": done, "input": items}, id=resp_id,
                                status=done["status"])
            if conv_id:
                rows = [("item", item, item["id"], conv_id, None, None, None) for item in items + done["output"]]
                await store.add_many(rows, owner)

        builder = OutputBuilder(response["output"])
        frames = serving.drive(generation, response, plan.options, finish, builder)
        if body.stream:
            return sse_response(serving.stream(frames, response, builder), Dialect.OPENAI, done_marker=False,
                                handles=generation.handles, on_close=lease.detach())
        done = await until_disconnect(request, serving.collect(frames, response), generation.handles)
        return JSONResponse(done)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    record = await store.get("response", response_id, owner, param="response_id")
    return record.data["response"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, store: Store = Depends(get_store),
                          owner: Owner = Depends(owner_of)) -> Any:
    await store.delete("response", response_id, owner, param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def response_input_items(
    response_id: str, limit: int = Query(20), order: str = Query("desc"), after: str | None = Query(None),
    store: Store = Depends(get_store), owner: Owner = Depends(owner_of),
) -> Any:
    record = await store.get("response", response_id, owner, param="response_id")
    return serving.item_page(record.data["input"], limit=limit, order=order, after=after)
