"""Anthropic response framing: a `message` object, or its SSE event stream.

Output is split by common/formats/output.py into thinking, text and tool
calls; each becomes a content block (`thinking`, `text`, `tool_use` with its
arguments as `input`). The stream is `message_start`, `ping`, per block
`content_block_start` / `content_block_delta` (`thinking_delta`, `text_delta`,
`input_json_delta`) / `content_block_stop`, then `message_delta` (stop_reason,
stop_sequence, usage) and `message_stop`; a failure after the first frame is
an `event: error` frame (endpoints/http/streaming.py).

stop_reason: `max_tokens` when the limit cut the output (inside a tool call
too), `tool_use` after a call, `stop_sequence` (with `stop_sequence` set)
when one of the client's stop sequences ended it, else `end_turn`.
`usage.input_tokens` counts the whole prompt, cached prefix included.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from backends.base import Finished, FinishReason, TextDelta
from common.formats.output import ChatDeltas, ChatOutput, OutputOptions, parse_whole
from common.formats.tools import ToolCall, ToolCallDelta
from common.generation.pipeline import Generation
from endpoints.http.streaming import dumps

CALL_PREFIX = "call_"  # the tool parser's ids; Anthropic's start with toolu_


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def tool_use_id(call_id: str | None) -> str:
    return "toolu_" + (call_id or secrets.token_hex(12)).removeprefix(CALL_PREFIX)


def stop_reason(finish: Finished, tool_calls: bool, stop_sequences: tuple[str, ...]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence)."""
    if finish.reason is FinishReason.LENGTH:
        return "max_tokens", None
    if tool_calls:
        return "tool_use", None
    if finish.stop_string is not None and finish.stop_string in stop_sequences:
        return "stop_sequence", finish.stop_string
    return "end_turn", None


def usage_body(finish: Finished | None, prompt_tokens: int) -> dict[str, int]:
    output = finish.usage.completion_tokens if finish is not None else 0
    return {"input_tokens": finish.usage.prompt_tokens if finish is not None else prompt_tokens,
            "output_tokens": output}


def _tool_use_block(call: ToolCall) -> dict[str, Any]:
    arguments = call.arguments_object()  # {} for arguments max_tokens cut short
    return {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {}}


def _message(mid: str, model_name: str, content: list[dict[str, Any]], reason: str | None, sequence: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model_name, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage}


async def message_response(
    generation: Generation, model_name: str, options: OutputOptions, stop_sequences: tuple[str, ...]
) -> dict[str, Any]:
    result = (await generation.collect())[0]
    assert result.finish is not None  # collect raises for a choice without one
    reasoning, text, calls = parse_whole(result.text, options)
    content: list[dict[str, Any]] = []
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text:
        content.append({"type": "text", "text": text})
    content += [_tool_use_block(c) for c in calls]
    reason, sequence = stop_reason(result.finish, bool(calls), stop_sequences)
    return _message(new_message_id(), model_name, content, reason, sequence,
                    usage_body(result.finish, len(generation.prompt_tokens)))


def event(kind: str, body: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {dumps({'type': kind, **body})}\n\n"


class BlockWriter:
    """Chat deltas -> content-block events: a block opens when a different kind of output starts
    (or a new tool call), and the open one closes first."""

    def __init__(self) -> None:
        self.index = -1
        self._open: tuple[str, int] | None = None  # (kind, tool call index)

    def _switch(self, kind: str, call: int, start: dict[str, Any]) -> list[str]:
        if self._open == (kind, call):
            return []
        out = self.close()
        self.index += 1
        self._open = (kind, call)
        return out + [event("content_block_start", {"index": self.index, "content_block": start})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"index": self.index, "delta": delta})

    def write(self, d: ChatDeltas) -> list[str]:
        out: list[str] = []
        if d.reasoning:
            out += self._switch("thinking", -1, {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            out += self._switch("text", -1, {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": d.content}))
        for call in d.tool_calls:
            out += self._tool(call)
        return out

    def _tool(self, d: ToolCallDelta) -> list[str]:
        out: list[str] = []
        if d.name is not None or self._open != ("tool_use", d.index):
            start = {"type": "tool_use", "id": tool_use_id(d.id), "name": d.name or "", "input": {}}
            out += self._switch("tool_use", d.index, start)
        if d.arguments_fragment:
            out.append(self._delta({"type": "input_json_delta", "partial_json": d.arguments_fragment}))
        return out

    def close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [event("content_block_stop", {"index": self.index})]


async def message_stream(
    generation: Generation, model_name: str, options: OutputOptions, stop_sequences: tuple[str, ...]
) -> AsyncIterator[str]:
    mid = new_message_id()
    usage = usage_body(None, len(generation.prompt_tokens))
    yield event("message_start", {"message": _message(mid, model_name, [], None, None, usage)})
    yield event("ping", {})
    output, blocks = ChatOutput(options), BlockWriter()
    async with aclosing(generation.events()) as events:
        async for _, ev in events:
            if isinstance(ev, TextDelta):
                for frame in blocks.write(output.feed(ev.text)) if ev.text else ():
                    yield frame
                continue
            if ev.reason is FinishReason.CANCELLED:
                return
            failure = generation.failure(ev)
            if failure is not None:
                raise failure  # an `event: error` frame
            for frame in blocks.write(output.finish()) + blocks.close():
                yield frame
            reason, sequence = stop_reason(ev, output.saw_tool_call, stop_sequences)
            yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                          "usage": usage_body(ev, len(generation.prompt_tokens))})
            yield event("message_stop", {})
