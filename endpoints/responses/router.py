"""Responses routes: POST /v1/responses, GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items."""

from __future__ import annotations

from typing import Any

from fastapi import Depends
from starlette.responses import Response

from common.errors import BadRequestError, Dialect
from common.generation.pipeline import start_generation
from common.store.ids import new_id
from common.store.store import Owner, Store
from endpoints.http.deps import RouteDialect, log_unknown_fields
from endpoints.http.route import GenerateDeps, answer, api_router, generate_deps
from endpoints.http.store import PageQuery, get_store, owner_of
from endpoints.openai.protocol import lora_pairs
from endpoints.responses import serving
from endpoints.responses.items import input_items, to_messages
from endpoints.responses.mapping import responses_params, responses_plan
from endpoints.responses.output import OutputBuilder
from endpoints.responses.protocol import ResponsesRequest

RESPONSES = RouteDialect(Dialect.OPENAI, max_tokens="max_output_tokens")

router = api_router(RESPONSES, tags=["OpenAI Responses"])


def conversation_id(value: str | dict[str, Any] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value.get("id"), str):
        return value["id"]
    raise BadRequestError("conversation must be a conversation id or {'id': ...}.", param="conversation")


@router.post("/v1/responses")
async def create_response(
    body: ResponsesRequest,
    deps: GenerateDeps = Depends(generate_deps),
    store: Store = Depends(get_store),
    owner: Owner = Depends(owner_of),
) -> Response:
    config = deps.config
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
    with await deps.lease(body.model) as lease:
        model = lease.model
        chat, plan = responses_plan(body, messages, model, config.model, deps.preset(model))
        with responses_params():
            generation = await start_generation(
                model, plan.prompt, plan.params, hooks=deps.hooks, constraint=plan.constraint,
                loras=lora_pairs(chat.loras), default_max_tokens=deps.default_max_tokens,
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
        return await answer(
            deps.request, lease, generation, stream=body.stream, dialect=Dialect.OPENAI, done_marker=False,
            frames=lambda: serving.stream(frames, response, builder),
            result=lambda: serving.collect(frames, response),
        )


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
async def response_input_items(response_id: str, q: PageQuery = Depends(), store: Store = Depends(get_store),
                               owner: Owner = Depends(owner_of)) -> Any:
    record = await store.get("response", response_id, owner, param="response_id")
    return serving.item_page(record.data["input"], limit=q.limit, order=q.order, after=q.after)
