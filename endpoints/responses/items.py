"""Responses-API items: the input a client sends, as stored items with ids, and as chat messages.

Items are what Responses, Conversations and stored contexts are made of:
`message` (role + text parts), `function_call`, `function_call_output` and
`reasoning`. `input_items` checks what a client sent and gives each item an
id; `to_messages` turns a context of items into the chat messages the model's
template renders. Tools and tool_choice are translated to the chat shapes
the shared tool layer takes.
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import BadRequestError
from common.store.ids import new_id

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _text_parts(content: Any, where: str, role: str) -> list[dict[str, Any]]:
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": kind, "text": content}
        if kind == "output_text":
            part["annotations"] = []
        return [part]
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content must be a string or a list of content parts.", param=f"{where}.content")
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in TEXT_PARTS or not isinstance(p.get("text", p.get("refusal")), str):
            if isinstance(p, dict) and p.get("type") in ("input_image", "input_file", "input_audio"):
                raise BadRequestError(
                    f"{where}.content[{j}] is {p['type']}; this server reads text only. Send input_text parts.",
                    param=f"{where}.content[{j}].type",
                )
            raise BadRequestError(
                f"{where}.content[{j}] must be {{'type': 'input_text', 'text': ...}}.", param=f"{where}.content[{j}]"
            )
        parts.append(dict(p))
    return parts


def input_items(raw: Any, param: str = "input") -> list[dict[str, Any]]:
    """The items a request sends (`input` as a string or a list of items), checked, each with an id."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise BadRequestError(f"'{param}' must be a string or a list of items.", param=param)
    out = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{where} must be an object (an item).", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise BadRequestError(f"{where}.role must be one of {', '.join(ROLES)}.", param=f"{where}.role")
            if "content" not in item:
                raise BadRequestError(f"{where}.content is missing; send the message's text.", param=f"{where}.content")
            out.append({"type": "message", "id": item.get("id") or new_id("msg"), "status": "completed", "role": role,
                        "content": _text_parts(item["content"], where, role)})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise BadRequestError(f"{where}.{key} must be a string.", param=f"{where}.{key}")
            out.append({"type": "function_call", "id": item.get("id") or new_id("fc"), "status": "completed",
                        "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise BadRequestError(f"{where}.call_id must be a string: the call_id of the function_call it answers.",
                                      param=f"{where}.call_id")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                raise BadRequestError(f"{where}.output must be a string.", param=f"{where}.output")
            out.append({"type": "function_call_output", "id": item.get("id") or new_id("fco"), "status": "completed",
                        "call_id": item["call_id"], "output": output})
        elif kind == "reasoning":
            out.append({"type": "reasoning", "id": item.get("id") or new_id("rs"), "summary": item.get("summary", []),
                        "content": item.get("content") or []})
        elif kind == "item_reference":
            raise BadRequestError(f"{where} is an item_reference, which this server does not resolve; send the "
                                  "item itself, or use previous_response_id.", param=f"{where}.type")
        else:
            raise BadRequestError(
                f"{where}.type '{kind}' is not supported; send message, function_call or function_call_output items.",
                param=f"{where}.type",
            )
    return out


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(str(p.get("text", p.get("refusal", ""))) for p in parts)


def to_messages(items: list[dict[str, Any]], instructions: str | None = None) -> list[dict[str, Any]]:
    """A context of items as chat messages (consecutive function calls join one assistant message)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item.get("type")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text_of(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses tools ({type: function, name, parameters}) in the chat shape ({type, function: {...}})."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise BadRequestError(
                f"tools[{i}] is of type '{kind}'; this server runs function tools only ({{'type': 'function', "
                "'name': ..., 'parameters': {...}}}).", param=f"tools[{i}].type",
            )
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequestError(f"tools[{i}].name must be the function's name.", param=f"tools[{i}].name")
        body = {"name": fn["name"], "parameters": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            body["description"] = fn["description"]
        out.append({"type": "function", "function": body})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """Responses tool_choice ({type: function, name}) in the chat shape ({type, function: {name}})."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        return {"type": "function", "function": {"name": name}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        raise BadRequestError("tool_choice 'allowed_tools' is not supported; send the allowed tools in 'tools'.",
                              param="tool_choice.type")
    raise BadRequestError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.", param="tool_choice"
    )


def tool_arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
