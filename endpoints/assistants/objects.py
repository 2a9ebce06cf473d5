"""Assistants API v2 objects as the wire shows them, and the cursor-list envelope.

Stored records hold exactly these shapes (record.data); what the store keeps
beside them (the run's tool-call turns) lives under keys starting with "_",
which `public` leaves out.
"""

from __future__ import annotations

import time
from typing import Any

from common.errors import BadRequestError
from common.store.store import Page, Record

ACTIVE = ("queued", "in_progress", "requires_action", "cancelling")
TERMINAL = ("completed", "failed", "cancelled", "expired", "incomplete")


def public(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not k.startswith("_")}


def page_body(page: Page) -> dict[str, Any]:
    data = [public(r.data) for r in page.items]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": page.has_more}


def text_of(content: str | list[dict[str, Any]], param: str) -> str:
    """Message content as text: a string, or text parts ({type: text, text}) joined."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequestError(
                f"{param}[{i}] must be {{'type': 'text', 'text': ...}}; this server reads text only.",
                param=f"{param}[{i}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def assistant_body(id: str, fields: dict[str, Any], created_at: int) -> dict[str, Any]:
    return {
        "id": id, "object": "assistant", "created_at": created_at, "name": fields.get("name"),
        "description": fields.get("description"), "model": fields.get("model") or "",
        "instructions": fields.get("instructions"), "tools": fields.get("tools") or [],
        "tool_resources": fields.get("tool_resources") or {}, "metadata": fields.get("metadata") or {},
        "temperature": fields.get("temperature"), "top_p": fields.get("top_p"),
        "response_format": fields.get("response_format") or "auto",
    }


def thread_body(id: str, created_at: int, metadata: dict[str, str] | None) -> dict[str, Any]:
    return {"id": id, "object": "thread", "created_at": created_at, "metadata": metadata or {},
            "tool_resources": {}}


def message_body(id: str, thread_id: str, role: str, text: str, *, assistant_id: str | None = None,
                 run_id: str | None = None, status: str = "completed", metadata: dict[str, str] | None = None,
                 created_at: int | None = None) -> dict[str, Any]:
    now = created_at or int(time.time())
    return {
        "id": id, "object": "thread.message", "created_at": now, "thread_id": thread_id, "status": status,
        "incomplete_details": None, "completed_at": now if status == "completed" else None, "incomplete_at": None,
        "role": role, "content": [{"type": "text", "text": {"value": text, "annotations": []}}] if text else [],
        "assistant_id": assistant_id, "run_id": run_id, "attachments": [], "metadata": metadata or {},
    }


def message_text(message: dict[str, Any]) -> str:
    return "".join(p["text"]["value"] for p in message.get("content", []) if p.get("type") == "text")


def step_body(id: str, run: dict[str, Any], kind: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": id, "object": "thread.run.step", "created_at": int(time.time()), "run_id": run["id"],
        "assistant_id": run["assistant_id"], "thread_id": run["thread_id"], "type": kind, "status": "in_progress",
        "cancelled_at": None, "completed_at": None, "expired_at": None, "failed_at": None, "last_error": None,
        "step_details": details, "usage": None, "metadata": {},
    }


def usage_body(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def as_record_data(record: Record) -> dict[str, Any]:
    return public(record.data)
