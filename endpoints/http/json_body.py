"""Strict JSON request bodies for every route.

Python's `json` module accepts more than JSON: `NaN` and `Infinity` literals,
escaped lone UTF-16 surrogates (`"\\ud800"`, which no UTF-8 encoder can write
back), and nesting deep enough to exhaust the interpreter's stack. Let through,
these fail far from the request (a tokenizer, a response renderer) as 500s.
`StrictJSONRoute` parses the body itself before FastAPI does and answers each
of them, and plain malformed JSON, with a 400 in the route's dialect that
names the field and says what to send instead.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute

from common.errors import BadRequestError

# Deeper than any real request (a JSON schema, tool parameters); shallow enough
# that no recursive consumer (pydantic, Jinja, llguidance) runs out of stack.
MAX_DEPTH = 64
# No field holds an integer this large (seeds go up to uint64; counts are far smaller).
MAX_INT_MAGNITUDE = 2**64


def _show(key: str) -> str:
    """A key as it can be printed (lone surrogates escaped)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{_show(key)}" if path else _show(key)


def _fault(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT_MAGNITUDE:
        return f"is a {len(str(abs(value)))}-digit integer; no field accepts numbers beyond 2**64, send a smaller one"
    if isinstance(value, float) and not math.isfinite(value):
        literal = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return f"is {literal}, which JSON does not allow; send a finite number (or leave the field out)"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            return (
                f"contains the lone UTF-16 surrogate \\u{ord(bad):04x}, which is not text; "
                "send valid Unicode (pair surrogates or use the character itself)"
            )
    return None


def check_json_value(data: Any) -> None:
    """Raise BadRequestError naming the first field that is NaN/Infinity, not text, or too deep."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise BadRequestError(
                f"The request body nests deeper than {MAX_DEPTH} levels at '{path}'; flatten it.",
                param=path or None,
            )
        if isinstance(value, dict):
            for key, item in value.items():
                child = _child(path, key)
                if (problem := _fault(key)) is not None:
                    raise BadRequestError(f"A key in '{path or 'the body'}' {problem}.", param=path or None)
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, _child(path, i), depth + 1) for i, item in enumerate(value))
        elif (problem := _fault(value)) is not None:
            where = f"'{path}'" if path else "The body"
            raise BadRequestError(f"{where} {problem}.", param=path or None)


def parse_json_body(body: bytes) -> Any:
    """Decode a request body as strict JSON; BadRequestError explains what is wrong."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start}). "
            "Send the JSON encoded as UTF-8."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}. "
            "Send one JSON object."
        ) from None
    except RecursionError:
        raise BadRequestError(f"The request body nests deeper than {MAX_DEPTH} levels; flatten it.") from None
    except ValueError:  # an integer literal longer than Python's digit limit
        raise BadRequestError(
            "The request body holds a number thousands of digits long, which no field accepts; send smaller numbers."
        ) from None
    check_json_value(data)
    return data


def _parses_as_json(content_type: str | None, strict: bool) -> bool:
    """Whether FastAPI would read this body as JSON (the same rule it applies)."""
    if not content_type:
        return not strict
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by `parse_json_body` before validation."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        setting = getattr(self, "strict_content_type", False)  # FastAPI < 0.130 has no such setting
        strict = bool(setting.value if isinstance(setting, DefaultPlaceholder) else setting)

        async def strict_handler(request: Request) -> Response:
            if _parses_as_json(request.headers.get("content-type"), strict):
                body = await request.body()
                if body:
                    # Starlette's Request.json() returns this cached value, so FastAPI validates it.
                    request._json = parse_json_body(body)
            return await handler(request)

        return strict_handler
