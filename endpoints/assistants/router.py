"""Assistants API v2 routes for assistants, threads and messages (runs live in runs.py)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, Query

from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.store.ids import id_for
from common.store.store import Owner, Store
from endpoints.assistants import objects
from endpoints.assistants.protocol import AssistantCreate, MessageCreate, MessageUpdate, ThreadCreate, ThreadUpdate
from endpoints.http.deps import RouteDialect, get_config
from endpoints.http.route import api_router
from endpoints.http.store import get_store, owner_of

ASSISTANTS = RouteDialect(Dialect.OPENAI, max_tokens="max_completion_tokens")

router = api_router(ASSISTANTS, tags=["OpenAI Assistants (beta)"])


class ListQuery:
    """limit / order / after / before, as every Assistants list takes them."""

    def __init__(self, limit: int = Query(20), order: str = Query("desc"), after: str | None = Query(None),
                 before: str | None = Query(None)) -> None:
        self.kw: dict[str, Any] = {"limit": limit, "order": order, "after": after, "before": before}


# -- assistants ---------------------------------------------------------------------------
@router.post("/v1/assistants")
async def create_assistant(body: AssistantCreate, store: Store = Depends(get_store),
                           owner: Owner = Depends(owner_of)) -> Any:
    aid = id_for("assistant")
    data = objects.assistant_body(aid, body.model_dump(exclude_none=True), int(time.time()))
    return (await store.add("assistant", owner, data, id=aid, created_at=data["created_at"])).data


@router.get("/v1/assistants")
async def list_assistants(q: ListQuery = Depends(), store: Store = Depends(get_store),
                          owner: Owner = Depends(owner_of)) -> Any:
    return objects.page_body(await store.list("assistant", owner, **q.kw))


@router.get("/v1/assistants/{assistant_id}")
async def get_assistant(assistant_id: str, store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    return (await store.get("assistant", assistant_id, owner, param="assistant_id")).data


@router.post("/v1/assistants/{assistant_id}")
async def update_assistant(assistant_id: str, body: AssistantCreate, store: Store = Depends(get_store),
                           owner: Owner = Depends(owner_of)) -> Any:
    record = await store.get("assistant", assistant_id, owner, param="assistant_id")
    fields = {**record.data, **body.model_dump(exclude_unset=True)}
    record.data = objects.assistant_body(assistant_id, fields, record.created_at)
    await store.save(record)
    return record.data


@router.delete("/v1/assistants/{assistant_id}")
async def delete_assistant(assistant_id: str, store: Store = Depends(get_store),
                           owner: Owner = Depends(owner_of)) -> Any:
    await store.delete("assistant", assistant_id, owner, param="assistant_id")
    return {"id": assistant_id, "object": "assistant.deleted", "deleted": True}


# -- threads ------------------------------------------------------------------------------
async def add_messages(store: Store, owner: Owner, thread_id: str, messages: list[MessageCreate],
                       config: ParleyConfig, param: str) -> list[dict[str, Any]]:
    """Append messages to a thread (refusing a thread that would pass store.max_thread_messages)."""
    if not messages:
        return []
    held = await store.count_children(thread_id, "message")
    cap = config.store.max_thread_messages
    if held + len(messages) > cap:
        raise BadRequestError(
            f"Thread {thread_id} holds {held} messages; {len(messages)} more would pass store.max_thread_messages "
            f"({cap}). Start a new thread.", param=param,
        )
    rows = []
    for i, m in enumerate(messages):
        mid = id_for("message")
        body = objects.message_body(mid, thread_id, m.role, objects.text_of(m.content, f"{param}[{i}].content"),
                                    metadata=m.metadata)
        rows.append(("message", body, mid, thread_id, None, None, None))
    return [r.data for r in await store.add_many(rows, owner)]


@router.post("/v1/threads")
async def create_thread(body: ThreadCreate | None = None, config: ParleyConfig = Depends(get_config),
                        store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    body = body or ThreadCreate()
    tid = id_for("thread")
    record = await store.add("thread", owner, objects.thread_body(tid, int(time.time()), body.metadata),
                             id=tid)
    await add_messages(store, owner, tid, body.messages or [], config, "messages")
    return record.data


@router.get("/v1/threads/{thread_id}")
async def get_thread(thread_id: str, store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    return (await store.get("thread", thread_id, owner, param="thread_id")).data


@router.post("/v1/threads/{thread_id}")
async def update_thread(thread_id: str, body: ThreadUpdate, store: Store = Depends(get_store),
                        owner: Owner = Depends(owner_of)) -> Any:
    record = await store.get("thread", thread_id, owner, param="thread_id")
    if body.metadata is not None:
        record.data["metadata"] = body.metadata
    await store.save(record)
    return record.data


@router.delete("/v1/threads/{thread_id}")
async def delete_thread(thread_id: str, store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    await store.delete("thread", thread_id, owner, param="thread_id")
    return {"id": thread_id, "object": "thread.deleted", "deleted": True}


# -- messages -----------------------------------------------------------------------------
@router.post("/v1/threads/{thread_id}/messages")
async def create_message(thread_id: str, body: MessageCreate, config: ParleyConfig = Depends(get_config),
                         store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    return (await add_messages(store, owner, thread_id, [body], config, "thread_id"))[0]


@router.get("/v1/threads/{thread_id}/messages")
async def list_messages(thread_id: str, q: ListQuery = Depends(), run_id: str | None = Query(None),
                        store: Store = Depends(get_store), owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    if run_id is not None:
        found = [r.data for r in await store.children(thread_id, "message") if r.data.get("run_id") == run_id]
        found = found if q.kw["order"] == "asc" else list(reversed(found))
        return {"object": "list", "data": found, "first_id": found[0]["id"] if found else None,
                "last_id": found[-1]["id"] if found else None, "has_more": False}
    return objects.page_body(await store.list("message", owner, parent_id=thread_id, **q.kw))


@router.get("/v1/threads/{thread_id}/messages/{message_id}")
async def get_message(thread_id: str, message_id: str, store: Store = Depends(get_store),
                      owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    return (await store.get("message", message_id, owner, param="message_id", parent_id=thread_id)).data


@router.post("/v1/threads/{thread_id}/messages/{message_id}")
async def update_message(thread_id: str, message_id: str, body: MessageUpdate, store: Store = Depends(get_store),
                         owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    record = await store.get("message", message_id, owner, param="message_id", parent_id=thread_id)
    if body.metadata is not None:
        record.data["metadata"] = body.metadata
    await store.save(record)
    return record.data


@router.delete("/v1/threads/{thread_id}/messages/{message_id}")
async def delete_message(thread_id: str, message_id: str, store: Store = Depends(get_store),
                         owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    await store.get("message", message_id, owner, param="message_id", parent_id=thread_id)
    await store.delete_children(thread_id, [message_id])
    return {"id": message_id, "object": "thread.message.deleted", "deleted": True}
