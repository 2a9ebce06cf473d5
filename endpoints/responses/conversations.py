"""Conversations routes: POST /v1/conversations, GET/POST/DELETE /v1/conversations/{id}, and its items
(list, add, get, delete). A response sent with `conversation` reads the items and appends its own."""

from __future__ import annotations

from typing import Any

from fastapi import Depends

from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.store.store import Owner, Record, Store
from endpoints.http.deps import RouteDialect, get_config
from endpoints.http.route import api_router
from endpoints.http.store import PageQuery, get_store, owner_of
from endpoints.responses.items import input_items
from endpoints.responses.protocol import ConversationCreate, ConversationUpdate, ItemsCreate

router = api_router(RouteDialect(Dialect.OPENAI), tags=["OpenAI Conversations"])


def conversation_body(record: Record) -> dict[str, Any]:
    return {"id": record.id, "object": "conversation", "created_at": record.created_at,
            "metadata": record.data.get("metadata", {})}


def item_list(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


async def _add_items(store: Store, owner: Owner, conv_id: str, raw: list[Any], config: ParleyConfig,
                     param: str) -> list[dict[str, Any]]:
    items = input_items(raw, param)
    held = await store.count_children(conv_id, "item")
    if held + len(items) > config.store.max_thread_messages:
        raise BadRequestError(
            f"Conversation {conv_id} holds {held} items; adding {len(items)} passes store.max_thread_messages "
            f"({config.store.max_thread_messages}). Start a new conversation.", param=param,
        )
    await store.add_many([("item", item, item["id"], conv_id, None, None, None) for item in items], owner)
    return items


@router.post("/v1/conversations")
async def create_conversation(body: ConversationCreate, config: ParleyConfig = Depends(get_config),
                              store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    record = await store.add("conversation", owner, {"metadata": body.metadata or {}}, id=None)
    if body.items:
        await _add_items(store, owner, record.id, body.items, config, "items")
    return conversation_body(record)


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, store: Store = Depends(get_store),
                           owner: Owner = Depends(owner_of)) -> Any:
    return conversation_body(await store.get("conversation", conversation_id, owner, param="conversation_id"))


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdate, store: Store = Depends(get_store),
                              owner: Owner = Depends(owner_of)) -> Any:
    record = await store.get("conversation", conversation_id, owner, param="conversation_id")
    record.data["metadata"] = body.metadata or {}
    await store.save(record)
    return conversation_body(record)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, store: Store = Depends(get_store),
                              owner: Owner = Depends(owner_of)) -> Any:
    await store.delete("conversation", conversation_id, owner, param="conversation_id")
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, q: PageQuery = Depends(), store: Store = Depends(get_store),
                     owner: Owner = Depends(owner_of)) -> Any:
    await store.get("conversation", conversation_id, owner, param="conversation_id")
    page = await store.list("item", owner, parent_id=conversation_id, limit=q.limit, order=q.order, after=q.after)
    return item_list([r.data for r in page.items], page.has_more)


@router.post("/v1/conversations/{conversation_id}/items")
async def create_items(conversation_id: str, body: ItemsCreate, config: ParleyConfig = Depends(get_config),
                       store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    await store.get("conversation", conversation_id, owner, param="conversation_id")
    return item_list(await _add_items(store, owner, conversation_id, body.items, config, "items"))


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, store: Store = Depends(get_store),
                   owner: Owner = Depends(owner_of)) -> Any:
    await store.get("conversation", conversation_id, owner, param="conversation_id")
    return (await store.get("item", item_id, owner, param="item_id", parent_id=conversation_id)).data


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, store: Store = Depends(get_store),
                      owner: Owner = Depends(owner_of)) -> Any:
    conversation = await store.get("conversation", conversation_id, owner, param="conversation_id")
    await store.get("item", item_id, owner, param="item_id", parent_id=conversation_id)
    await store.delete_children(conversation_id, [item_id])
    return conversation_body(conversation)
