"""Prompts from requests: chat messages through the model's template, raw text or token ids.

Every dialect's mapping builds its prompt here; `start_generation`
(pipeline.py) then fits and runs it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from typing import Any

from backends.base import ChatInput, ImageInput, MediaPrompt
from common.errors import BadRequestError, ContextLengthExceededError
from common.generation.images import RESOLVED
from common.models.manager import LoadedModel


@dataclass
class Prompt:
    tokens: list[int]
    text: str | None = None
    stop: tuple[str, ...] = ()  # stop strings the chat template declares
    param: str = "prompt"  # the request field this prompt came from, for error messages
    chat: ChatInput | None = None  # the messages, for a model whose server renders chat itself
    affinity_key: str | None = None  # the leading part that names where this prompt is cached
    images: tuple[ImageInput, ...] = ()  # in the order of the image markers in `text`
    media: MediaPrompt | None = None  # set once the engine has tokenized text and images together
    add_bos: bool = False  # for the engine's tokenization of an image prompt


def _is_resolved_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == RESOLVED and isinstance(part.get("image"), int)


def _text_of(content: Any, where: str, marker: str | None = None) -> str | None:
    """OpenAI content: a string, None, or a list of parts; text parts are joined (resolved images as `marker`)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if marker is not None and _is_resolved_image(part):
                texts.append(marker)
            elif isinstance(part, str):
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
    messages: list[dict[str, Any]], *, template_knows_tool_calls: bool = True, image_marker: str | None = None,
    keep_image_parts: bool = False,
) -> list[dict[str, Any]]:
    """Messages as chat templates read them. Resolved image parts become `image_marker` in the text, or, with
    `keep_image_parts`, stay content lists of text parts and `{"type": "image"}` parts (as HF processors pass)."""
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
        content = msg.get("content")
        if keep_image_parts and isinstance(content, list) and any(_is_resolved_image(p) for p in content):
            m["content"] = _parts_for_template(content, where)
        else:
            m["content"] = _text_of(content, where, image_marker)
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


def _parts_for_template(content: list[Any], where: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        if _is_resolved_image(part):
            parts.append({"type": "image"})
        else:
            parts.append({"type": "text", "text": _text_of([part], f"{where}") or ""})
    return parts


def _render_with_images(
    model: LoadedModel, messages: list[dict[str, Any]], n_images: int, knows_tools: bool, render: Any
) -> str:
    """Render a chat with images so each lands where the template puts images, as the engine's marker.

    A template that renders `{"type": "image"}` parts (a vision model's) writes its own placeholder for each;
    those become the engine's marker, and the projector adds the model's image tokens around the image. Other
    templates get the marker inline where the image part was, as llama.cpp's server does.
    """
    marker = model.engine.image_marker
    assert model.template is not None and marker is not None
    placeholder = model.template.image_placeholder()
    if placeholder:
        normalized = normalize_messages(messages, template_knows_tool_calls=knows_tools, keep_image_parts=True)
        text = render(normalized)
        if text.count(placeholder) == n_images:
            return text.replace(placeholder, marker)
    return render(normalize_messages(messages, template_knows_tool_calls=knows_tools, image_marker=marker))


def chat_prompt(
    model: LoadedModel,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    template_vars: dict[str, Any] | None = None,
    response_prefix: str | None = None,
    images: list[ImageInput] | tuple[ImageInput, ...] = (),
) -> Prompt:
    """`images`: what resolve_message_images found, for the `{"type": "image", "image": i}` parts of `messages`."""
    template = model.template
    if template is None:
        raise BadRequestError(
            "The loaded model has no chat template. Switch one with POST /v1/template/switch, "
            "or use /v1/completions with a raw prompt.",
            param="messages",
        )
    info = model.info
    source = template.source
    knows_tools = "tool_calls" in source

    def render(normalized: list[dict[str, Any]]) -> str:
        if tools and "tools" not in source:
            # The template cannot show tools: tell the model in a system message instead.
            note = _tools_system_text(tools)
            if normalized[0]["role"] == "system":
                normalized[0] = {**normalized[0], "content": f"{normalized[0]['content']}\n\n{note}"}
            else:
                normalized.insert(0, {"role": "system", "content": note})
        return template.render(
            normalized,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            tools=tools,
            template_vars=template_vars,
        )

    if images:
        text = _render_with_images(model, messages, len(images), knows_tools, render)
    else:
        normalized = normalize_messages(messages, template_knows_tool_calls=knows_tools)
        text = render(normalized)  # adds the tools note to `normalized` when the template cannot show tools
    if response_prefix:
        text += response_prefix
    add_bos = info.add_bos_token and not (info.bos_token and text.startswith(info.bos_token))
    refuse_hopeless(model, text, "messages")
    stop = tuple(template.metadata.stop_strings)
    if images:  # tokenized with the images by start_generation, off the event loop
        return Prompt([], text, stop, param="messages", images=tuple(images), add_bos=add_bos, affinity_key=text)
    tokens = model.engine.tokenize(text, add_bos=add_bos, special=True)
    if getattr(model.engine, "renders_chat", False) and not (continue_final_message or response_prefix or not add_generation_prompt):
        # The server applies its model's own template and tool format; the text above only
        # measures the prompt and keys routing. A continued or prefixed reply goes as text instead.
        chat = ChatInput(tuple(normalized), tuple(tools) if tools else None, template_vars=template_vars)
        return Prompt(tokens, text, (), param="messages", chat=chat, affinity_key=text)
    return Prompt(tokens, text, stop, param="messages", affinity_key=text)


def refuse_hopeless(model: LoadedModel, text: str, param: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context even if every token were the
    vocabulary's longest: tokenizing megabytes would hold the server for seconds only to say so."""
    n_ctx = model.info.n_ctx
    if not model.may_fit(len(text), n_ctx):
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens, and this prompt of {len(text):,} "
            f"characters needs more than {n_ctx} tokens. Shorten the prompt or the conversation, or load "
            "the model with a larger max_seq_len.",
            param=param,
        )


def text_prompt(
    model: LoadedModel, prompt: str | list[int], *, add_bos: bool | None = None, truncatable: bool = False,
    images: list[ImageInput] | tuple[ImageInput, ...] = (),
) -> Prompt:
    """`truncatable`: the caller cuts an overlong prompt itself (KoboldAI does), so no early refusal.

    `images` go where the text has the engine's image marker, else (none written) before the text."""
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
    if images and isinstance(prompt, str):
        marker = model.engine.image_marker or ""
        if marker and prompt.count(marker) == 0:
            prompt = "".join(f"{marker}\n" for _ in images) + prompt
        return Prompt([], prompt, images=tuple(images), add_bos=add_bos, affinity_key=prompt)
    return Prompt(model.engine.tokenize(prompt, add_bos=add_bos, special=True), prompt, affinity_key=prompt)


async def tokenize_images(model: LoadedModel, prompt: Prompt) -> Prompt:
    """A prompt with images, tokenized by the engine with them (off the event loop); others unchanged."""
    if not prompt.images or prompt.media is not None:
        return prompt
    media = await asyncio.to_thread(
        model.engine.tokenize_with_images, prompt.text or "", list(prompt.images), add_bos=prompt.add_bos
    )
    return replace(prompt, tokens=list(media.tokens), media=media)

