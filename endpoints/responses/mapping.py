"""A Responses request -> the chat plan every chat route runs (prompt, params, constraint, output options).

The Responses fields map onto a chat completion request (input items ->
messages, `text.format` -> response_format, `max_output_tokens` ->
max_tokens, function tools and tool_choice -> the chat shapes), so the
template, tools, constraints and presets are the chat path's, not a copy.
Errors raised on the way name the Responses field (`input`, `text.format`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from common.config.schema import ModelConfig
from common.errors import APIError, BadRequestError
from common.models.manager import LoadedModel
from common.models.presets import Preset
from endpoints.openai.mapping import ChatPlan, chat_plan
from endpoints.openai.protocol import ChatCompletionRequest, SamplerFields
from endpoints.responses.items import chat_tool_choice, chat_tools
from endpoints.responses.protocol import ResponsesRequest

_RENAMED = (("messages", "input"), ("response_format.json_schema.schema", "text.format.schema"),
            ("response_format", "text.format"), ("max_tokens", "max_output_tokens"))
_EFFORTS = ("minimal", "low", "medium", "high")


@contextmanager
def responses_params() -> Iterator[None]:
    """Rename the chat field an error names to the Responses field it came from."""
    try:
        yield
    except APIError as exc:
        for chat, ours in _RENAMED:
            if exc.param and (exc.param == chat or exc.param.startswith(chat + ".") or exc.param.startswith(chat + "[")):
                exc.message = exc.message.replace(f"'{chat}'", f"'{ours}'")
                exc.param = ours + exc.param[len(chat):]
                break
        raise


def text_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` ({type: json_schema, name, schema, strict}) as chat's response_format."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadRequestError("text.format must be an object with a 'type'.", param="text.format")
    kind = fmt.get("type", "text")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequestError("text.format of type json_schema needs 'schema', a JSON schema object.",
                                  param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]}}
    raise BadRequestError(f"text.format.type '{kind}' is not supported; use text, json_object or json_schema.",
                          param="text.format.type")


def chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    fields = body.model_dump(include=set(SamplerFields.model_fields) - {"n"}, exclude_none=True)
    fields.update(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                  tools=chat_tools(body.tools), tool_choice=chat_tool_choice(body.tool_choice),
                  parallel_tool_calls=body.parallel_tool_calls, response_format=text_format(body.text))
    effort = (body.reasoning or {}).get("effort")
    if effort in _EFFORTS:
        fields["reasoning_effort"] = effort
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BadRequestError(f"Invalid request: {where}: {err.get('msg')}. Fix the field and retry.",
                              param=where or None) from None


def responses_plan(body: ResponsesRequest, messages: list[dict[str, Any]], model: LoadedModel, mc: ModelConfig,
                   preset: Preset | None) -> tuple[ChatCompletionRequest, ChatPlan]:
    with responses_params():
        chat = chat_request(body, messages)
        return chat, chat_plan(chat, model, mc, preset)
