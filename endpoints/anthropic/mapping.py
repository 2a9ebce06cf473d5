"""Anthropic Messages request -> chat messages, prompt, SamplingParams, constraint and output options.

Anthropic's shapes are turned into the chat shape the templates and the tool
machinery already read (common/formats): `system` becomes the first message,
an assistant's `tool_use` blocks become `tool_calls`, a user's `tool_result`
blocks become `tool` messages (before the user's text, as Anthropic orders
them), `thinking` blocks become `reasoning_content`. Tools become function
tools and `tool_choice` any / tool / none become "required" / a named function
/ "none", so a forced call is constrained by the same grammar as OpenAI's.
Sampling follows the shared precedence (common/models/presets.build_params);
Parley's other samplers and constraints come through the OpenAI field set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backends.sampling import SamplingParams
from common.config.schema import ModelConfig
from common.errors import BadRequestError
from common.formats.constraints import ConstraintSpec
from common.formats.output import OutputOptions
from common.formats.tools import tool_call_grammar
from common.generation.prompts import Prompt, chat_prompt
from common.models.manager import LoadedModel
from common.models.presets import Preset, build_params
from endpoints.anthropic.protocol import Block, InputMessage, MessagesRequest, PromptFields, ToolChoice
from endpoints.openai.mapping import constraint_spec, sent_fields

_IMAGE_TYPES = ("image", "document", "search_result")


def _bad(where: str, message: str) -> BadRequestError:
    return BadRequestError(f"{where}: {message}", param=where)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "must be a string; send the text as a JSON string.")
    return value


def _unsupported(block: Block, where: str, allowed: str) -> BadRequestError:
    kind = block.get("type")
    if kind in _IMAGE_TYPES:
        return _bad(f"{where}.type", f"'{kind}' blocks cannot be read by the loaded model (no vision support); "
                                     "send text blocks only.")
    return _bad(f"{where}.type", f"{kind!r} is not a block type here; use {allowed}.")


def _blocks(content: str | list[Block], where: str) -> list[tuple[Block, str]]:
    """Content as (block, where) pairs: a string is one text block."""
    if isinstance(content, str):
        return [({"type": "text", "text": content}, where)]
    out = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(at, 'each content block must be an object with a type, e.g. {"type": "text", "text": "..."}.')
        out.append((block, at))
    return out


def system_text(system: str | list[Block] | None) -> str | None:
    """`system`: a string or a list of text blocks (joined with blank lines)."""
    if system is None or isinstance(system, str):
        return system or None
    parts = []
    for block, at in _blocks(system, "system"):
        if block["type"] != "text":
            raise _unsupported(block, at, "'text'")
        parts.append(_text(block.get("text"), f"{at}.text"))
    return "\n\n".join(parts) or None


def _tool_result_text(block: Block, where: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for inner, at in _blocks(content, f"{where}.content"):
            if inner["type"] != "text":
                raise _unsupported(inner, at, "'text'")
            texts.append(_text(inner.get("text"), f"{at}.text"))
        text = "\n".join(texts)
    else:
        raise _bad(f"{where}.content", 'must be a string or a list of text blocks ({"type": "text", "text": "..."}).')
    return f"Error: {text}" if block.get("is_error") else text


def _user_turn(msg: InputMessage, where: str, called: dict[str, str]) -> list[dict[str, Any]]:
    """A user turn: its tool results as `tool` messages, then its text as one user message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block, at in _blocks(msg.content, f"{where}.content"):
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block.get("text"), f"{at}.text"))
        elif kind == "tool_result":
            call_id = _text(block.get("tool_use_id"), f"{at}.tool_use_id")
            if call_id not in called:
                raise _bad(f"{at}.tool_use_id", f"'{call_id[:80]}' answers no tool_use block of an earlier assistant "
                                                "turn; send the tool_use_id the assistant's tool_use block had.")
            out.append({"role": "tool", "tool_call_id": call_id, "name": called[call_id],
                        "content": _tool_result_text(block, at)})
        else:
            raise _unsupported(block, at, "'text' or 'tool_result'")
    if texts or not out:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_turn(msg: InputMessage, where: str, called: dict[str, str]) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block, at in _blocks(msg.content, f"{where}.content"):
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block.get("text"), f"{at}.text"))
        elif kind == "thinking":
            thinking.append(_text(block.get("thinking"), f"{at}.thinking"))
        elif kind == "redacted_thinking":
            continue  # opaque to every model but the one that wrote it
        elif kind == "tool_use":
            call_id = _text(block.get("id"), f"{at}.id")
            name = _text(block.get("name"), f"{at}.name")
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise _bad(f"{at}.input", 'must be an object (the tool\'s arguments), e.g. {"city": "Paris"}.')
            called[call_id] = name
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        else:
            raise _unsupported(block, at, "'text', 'thinking' or 'tool_use'")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        out["tool_calls"] = calls
    if thinking:
        out["reasoning_content"] = "".join(thinking)
    return out


def chat_messages(messages: list[InputMessage], system: str | list[Block] | None) -> list[dict[str, Any]]:
    """Anthropic turns -> the chat messages templates read."""
    out: list[dict[str, Any]] = []
    text = system_text(system)
    if text is not None:
        out.append({"role": "system", "content": text})
    called: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role == "user":
            out.extend(_user_turn(msg, where, called))
        else:
            out.append(_assistant_turn(msg, where, called))
    return out


def function_tools(tools: list[Block] | None) -> list[dict[str, Any]] | None:
    """Anthropic's client tools `{name, description, input_schema}` as function tools."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"{at}.type", f"'{kind}' is a tool Anthropic runs on its servers; only client tools "
                                     "({\"name\", \"description\", \"input_schema\"}) run here.")
        name = _text(tool.get("name"), f"{at}.name")
        if not name:
            raise _bad(f"{at}.name", "must not be empty; name the tool the model may call.")
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema",
                       'must be a JSON schema object, e.g. {"type": "object", "properties": {...}}.')
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        if tool.get("description") is not None:
            fn["description"] = _text(tool["description"], f"{at}.description")
        out.append({"type": "function", "function": fn})
    return out


def openai_tool_choice(choice: ToolChoice | None, tools: list[dict[str, Any]] | None) -> tuple[Any, bool]:
    """(the OpenAI-style tool_choice, whether several calls may come)."""
    if choice is None:
        return ("auto" if tools else None), True
    parallel = not choice.disable_parallel_tool_use
    if choice.type in ("any", "tool") and not tools:
        raise _bad("tool_choice", f"type '{choice.type}' needs 'tools'; send the tools the model may call.")
    if choice.type == "tool":
        if not choice.name:
            raise _bad("tool_choice.name", "type 'tool' needs the name of the tool to call.")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def thinking_enabled(body: PromptFields) -> bool | None:
    """True/False when `thinking` says so; None when it was not sent."""
    if body.thinking is None:
        return None
    return body.thinking.type != "disabled"


def build_prompt(model: LoadedModel, body: PromptFields) -> tuple[Prompt, list[dict[str, Any]] | None, Any, bool]:
    """The chat prompt of a request: (prompt, function tools, OpenAI tool_choice, parallel)."""
    messages = chat_messages(body.messages, body.system)
    tools = function_tools(body.tools)
    choice, parallel = openai_tool_choice(body.tool_choice, tools)
    last = messages[-1]
    # As Anthropic: a final assistant turn with text is a prefill the answer continues.
    prefill = last["role"] == "assistant" and bool(last["content"]) and not last.get("tool_calls")
    thinking = thinking_enabled(body)
    prompt = chat_prompt(
        model, messages, continue_final_message=prefill,
        tools=tools if choice != "none" else None,
        template_vars=None if thinking is None else {"enable_thinking": thinking},
    )
    return prompt, tools, choice, parallel


def output_format(body: MessagesRequest) -> ConstraintSpec | None:
    """`output_config.format` `{"type": "json_schema", "schema": {...}}`: the answer is JSON valid against it
    (Anthropic's structured outputs), through the same constraint layer as the other dialects' schemas."""
    fmt = (body.output_config or {}).get("format")
    if fmt is None:
        return None
    where = "output_config.format"
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _bad(f"{where}.type", "must be 'json_schema', with the schema in 'schema'.")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise _bad(f"{where}.schema", "must be a JSON schema object.")
    try:
        return ConstraintSpec.from_request(json_schema=schema)
    except BadRequestError as exc:
        raise _bad(f"{where}.schema", exc.message) from exc


def _constraint(body: MessagesRequest, forced: ConstraintSpec | None) -> ConstraintSpec | None:
    """At most one of: a forced tool call, output_config.format, Parley's json_schema/regex/grammar fields."""
    candidates = (
        ("tool_choice", forced),
        ("output_config.format", output_format(body)),
        ("json_schema/regex_pattern/grammar_string", constraint_spec(body, None)),
    )
    specs = [(name, spec) for name, spec in candidates if spec is not None]
    if len(specs) > 1:
        raise _bad(specs[1][0], f"cannot be combined with {specs[0][0]}: both constrain the output; drop one of them.")
    return specs[0][1] if specs else None


@dataclass(frozen=True)
class MessagesPlan:
    """A /v1/messages request as the pipeline takes it, and how its output is split and framed."""

    prompt: Prompt
    params: SamplingParams
    constraint: ConstraintSpec | None
    options: OutputOptions
    stop_sequences: tuple[str, ...]  # the client's: a match ends with stop_reason "stop_sequence"


def message_plan(body: MessagesRequest, model: LoadedModel, mc: ModelConfig, preset: Preset | None) -> MessagesPlan:
    if body.n != 1:
        raise _bad("n", "the Messages API answers one message per request; send n=1, or several requests.")
    prompt, tools, choice, parallel = build_prompt(model, body)
    options = OutputOptions.for_request(
        prompt_text=prompt.text,
        template_source=model.template.source if model.template else None,
        tools=tools,
        tool_choice=choice,
        reasoning=bool(thinking_enabled(body)) and mc.reasoning_parser,
        start=mc.reasoning_start_marker,
        end=mc.reasoning_end_marker,
        tool_format=mc.tool_format,
    )
    forced = None
    if tools and options.tool_format is not None:
        forced = tool_call_grammar(tools, choice, parallel, options.tool_format)
    spec = _constraint(body, forced)
    sent = sent_fields(body)
    stops = tuple(s for s in (body.stop_sequences or ()) if s)
    sent["stop"] = sent.get("stop", ()) + tuple(s for s in stops if s not in sent.get("stop", ()))
    sent["max_tokens"] = body.max_tokens
    try:
        params = build_params(sent, preset)
    except BadRequestError as exc:
        if exc.param == "stop":
            raise _bad("stop_sequences", exc.message) from exc
        raise
    if options.tool_format is not None:
        params = params.with_updates(skip_special_tokens=False)  # some formats mark calls with special tokens
    return MessagesPlan(prompt, params, spec, options, sent["stop"])
