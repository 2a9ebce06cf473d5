"""Prompts from requests: chat messages through the model's template, raw text or token ids.

Every dialect's mapping builds its prompt here; `start_generation`
(pipeline.py) then fits and runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backends.base import ChatInput
from common.errors import BadRequestError, ContextLengthExceededError
from common.models.manager import LoadedModel


@dataclass
class Prompt:
    tokens: list[int]
    text: str | None = None
    stop: tuple[str, ...] = ()  # stop strings the chat template declares
    param: str = "prompt"  # the request field this prompt came from, for error messages
    chat: ChatInput | None = None  # the messages, for a model whose server renders chat itself
    affinity_key: str | None = None  # the leading part that names where this prompt is cached


def _text_of(content: Any, where: str) -> str | None:
    """OpenAI content: a string, None, or a list of parts; text parts are joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise BadRequestError(
                        f"{where}.content[{i}].text must be a string.", param=f"{where}.content[{i}].text"
                    )
                texts.append(text)
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                raise BadRequestError(
                    f"{where}.content[{i}] is an image, and the loaded model cannot read images. "
                    "Send text only, or load a vision model.",
                    param=f"{where}.content",
                )
            else:
                raise BadRequestError(
                    f"{where}.content[{i}] has an unsupported part type; use {{'type': 'text', 'text': ...}}.",
                    param=f"{where}.content",
                )
        return "".join(texts)
    raise BadRequestError(f"{where}.content must be a string or a list of parts.", param=f"{where}.content")


def _tool_calls_for_template(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI sends arguments as a JSON string; HF templates expect an object."""
    if not isinstance(calls, list):
        raise BadRequestError(f"{where}.tool_calls must be a list.", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("function") or {}, dict):
            raise BadRequestError(
                f"{where}.tool_calls[{j}] must be an object like "
                "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': '...'}}.",
                param=f"{where}.tool_calls[{j}]",
            )
        call = dict(call)
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # leave it as the client sent it
        call["function"] = fn
        out.append(call)
    return out


def _inline_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Tool calls as text, for templates that know nothing of tool_calls (Hermes style)."""
    parts = []
    for call in calls:
        fn = call.get("function", {})
        parts.append(
            "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}) + "\n</tool_call>"
        )
    return "\n".join(parts)


def _tools_system_text(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t.get("function", t)) for t in tools)
    return (
        "You may call functions. Available functions:\n<tools>\n" + listing + "\n</tools>\n"
        'To call one, reply with <tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
    )


def normalize_messages(
    messages: list[dict[str, Any]], *, template_knows_tool_calls: bool = True
) -> list[dict[str, Any]]:
    if not messages:
        raise BadRequestError("'messages' must contain at least one message.", param="messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise BadRequestError(
                f"{where}.role '{role}' is not one of system, developer, user, assistant, tool.",
                param=f"{where}.role",
            )
        m = dict(msg)
        m["role"] = "system" if role == "developer" else role
        m["content"] = _text_of(msg.get("content"), where)
        if m["content"] is None and not (role == "assistant" and msg.get("tool_calls")):
            # As OpenAI: only an assistant message that calls tools may leave out its text.
            state = "null" if "content" in msg else "missing"
            raise BadRequestError(
                f"{where}.content is {state}; a {role} message needs text (a string or a list of text parts).",
                param=f"{where}.content",
            )
        if msg.get("tool_calls"):
            m["tool_calls"] = _tool_calls_for_template(msg["tool_calls"], where)
            if not template_knows_tool_calls:
                m["content"] = ((m["content"] or "") + "\n" + _inline_tool_calls(m.pop("tool_calls"))).strip()
        if m["content"] is None:
            m["content"] = ""
        out.append(m)
    return out


def chat_prompt(
    model: LoadedModel,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    template_vars: dict[str, Any] | None = None,
    response_prefix: str | None = None,
) -> Prompt:
    template = model.template
    if template is None:
        raise BadRequestError(
            "The loaded model has no chat template. Switch one with POST /v1/template/switch, "
            "or use /v1/completions with a raw prompt.",
            param="messages",
        )
    info = model.info
    source = template.source
    normalized = normalize_messages(messages, template_knows_tool_calls="tool_calls" in source)
    if tools and "tools" not in source:
        # The template cannot show tools: tell the model in a system message instead.
        note = _tools_system_text(tools)
        if normalized[0]["role"] == "system":
            normalized[0] = {**normalized[0], "content": f"{normalized[0]['content']}\n\n{note}"}
        else:
            normalized.insert(0, {"role": "system", "content": note})
    text = template.render(
        normalized,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        tools=tools,
        template_vars=template_vars,
    )
    if response_prefix:
        text += response_prefix
    add_bos = info.add_bos_token and not (info.bos_token and text.startswith(info.bos_token))
    refuse_hopeless(model, text, "messages")
    tokens = model.engine.tokenize(text, add_bos=add_bos, special=True)
    if getattr(model.engine, "renders_chat", False) and not (continue_final_message or response_prefix or not add_generation_prompt):
        # The server applies its model's own template and tool format; the text above only
        # measures the prompt and keys routing. A continued or prefixed reply goes as text instead.
        chat = ChatInput(tuple(normalized), tuple(tools) if tools else None, template_vars=template_vars)
        return Prompt(tokens, text, (), param="messages", chat=chat, affinity_key=text)
    return Prompt(tokens, text, tuple(template.metadata.stop_strings), param="messages", affinity_key=text)


def refuse_hopeless(model: LoadedModel, text: str, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context even if every token were the
    vocabulary's longest: tokenizing megabytes would hold the server for seconds only to say so."""
    n_ctx = model.info.n_ctx
    # A token covers at most max_token_bytes bytes, and a character is at least one byte.
    if len(text) > n_ctx * model.max_token_bytes:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens, and this prompt of {len(text):,} "
            f"characters needs more than {n_ctx} tokens. Shorten the prompt or the conversation, or load "
            "the model with a larger max_seq_len.",
            param=param,
        )


def text_prompt(
    model: LoadedModel, prompt: str | list[int], *, add_bos: bool | None = None, truncatable: bool = False
) -> Prompt:
    """`truncatable`: the caller cuts an overlong prompt itself (KoboldAI does), so no early refusal."""
    info = model.info
    if isinstance(prompt, list) and not getattr(model.engine, "knows_vocabulary", True):
        raise BadRequestError(
            "This model is served by a remote server whose vocabulary Parley does not hold: send the prompt "
            "as text, not token ids.", param="prompt",
        )
    if isinstance(prompt, list):
        bad = next((t for t in prompt if not (0 <= t < info.n_vocab)), None)
        if bad is not None:
            raise BadRequestError(f"Token id {bad} is outside the vocabulary (0..{info.n_vocab - 1}).", param="prompt")
        return Prompt(list(prompt))
    if add_bos is None:
        add_bos = info.add_bos_token
    if add_bos and info.bos_token and prompt.startswith(info.bos_token):
        add_bos = False
    if not truncatable:
        refuse_hopeless(model, prompt, "prompt")
    return Prompt(model.engine.tokenize(prompt, add_bos=add_bos, special=True), prompt, affinity_key=prompt)

