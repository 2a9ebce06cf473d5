"""Split a chat model's output into reasoning, content and tool calls, streaming.

Reasoning comes first (between the reasoning markers); tool-call parsing
applies to what follows. One `ChatOutput` per choice; every chat dialect
(OpenAI, Ollama) frames what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.formats.reasoning import ReasoningParser, prompt_opens_reasoning
from common.formats.tools import ToolCall, ToolCallDelta, ToolCallStreamParser, ToolFormat, collect, detect_format, tool_names
from common.formats.tool_parsing import ContentDelta


@dataclass
class ChatDeltas:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass(frozen=True)
class OutputOptions:
    reasoning: bool = True
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    starts_in_reasoning: bool = False
    tool_format: ToolFormat | None = None  # None: no tool parsing
    tool_names: tuple[str, ...] = ()

    @classmethod
    def for_request(
        cls,
        *,
        prompt_text: str | None,
        template_source: str | None,
        tools: list[dict[str, Any]] | None,
        tool_choice: Any,
        reasoning: bool = True,
        start: str = "<think>",
        end: str = "</think>",
        tool_format: str = "auto",
    ) -> OutputOptions:
        parse_tools = bool(tools) and tool_choice != "none"
        fmt = None
        if parse_tools:
            fmt = detect_format(template_source) if tool_format == "auto" else ToolFormat(tool_format)
        opens = bool(reasoning and prompt_text and prompt_opens_reasoning(prompt_text, start, end))
        return cls(
            reasoning=reasoning,
            reasoning_start=start,
            reasoning_end=end,
            starts_in_reasoning=opens,
            tool_format=fmt,
            tool_names=tuple(tool_names(tools or [])),
        )


class ChatOutput:
    def __init__(self, options: OutputOptions) -> None:
        self._reasoning = (
            ReasoningParser(options.reasoning_start, options.reasoning_end, starts_in_reasoning=options.starts_in_reasoning)
            if options.reasoning
            else None
        )
        self._tools = (
            ToolCallStreamParser(options.tool_format, options.tool_names or None)
            if options.tool_format is not None
            else None
        )
        self.saw_tool_call = False

    def feed(self, text: str) -> ChatDeltas:
        if self._reasoning is None:
            return self._content(text, final=False)
        reasoning, content = self._reasoning.feed(text)
        out = self._content(content, final=False)
        out.reasoning = reasoning
        return out

    def finish(self) -> ChatDeltas:
        reasoning, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        out = self._content(content, final=True)
        out.reasoning = reasoning
        return out

    def _content(self, text: str, *, final: bool) -> ChatDeltas:
        if self._tools is None:
            return ChatDeltas(content=text)
        deltas = self._tools.feed(text) if text else []
        if final:
            deltas += self._tools.finish()
        out = ChatDeltas()
        for d in deltas:
            if isinstance(d, ContentDelta):
                out.content += d.text
            else:
                out.tool_calls.append(d)
                self.saw_tool_call = True
        return out


def parse_whole(text: str, options: OutputOptions) -> tuple[str | None, str, list[ToolCall]]:
    """Non-streaming: (reasoning or None, content, tool calls)."""
    out = ChatOutput(options)
    first, last = out.feed(text), out.finish()
    reasoning = first.reasoning + last.reasoning
    content = first.content + last.content
    calls = collect([*first.tool_calls, *last.tool_calls])[1] if (first.tool_calls or last.tool_calls) else []
    saw = options.reasoning and (reasoning or options.starts_in_reasoning or out._reasoning and out._reasoning.saw_reasoning)
    return (reasoning if saw else None), content, calls
