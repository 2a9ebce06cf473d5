"""Reasoning ("thinking") split from the answer, streaming-safe, for every API.

Models such as DeepSeek-R1, Qwen3 or SmolLM3 write their reasoning between
markers (`<think>` ... `</think>` by default) before the answer. The parser
turns streamed text into (reasoning_delta, content_delta) pairs, which map to
OpenAI's `reasoning_content`, Ollama's `message.thinking`, and so on:

    parser = ReasoningParser(starts_in_reasoning=prompt_opens_reasoning(prompt))
    for text in stream:
        reasoning, content = parser.feed(text)
    reasoning, content = parser.finish()

Rules:
- The start marker counts only at the beginning of the output (after
  optional whitespace); without it, everything is content, unchanged.
- `starts_in_reasoning=True` is for templates whose generation prompt already
  opened the block (the prompt ends with `<think>`): output is reasoning
  until the end marker. `prompt_opens_reasoning(prompt)` tells which.
- Whitespace right after the start marker, right before the end marker and
  right after the end marker is dropped.
- Text that may be the beginning of a marker is held back until decided, so
  a marker split across chunks never leaks into either stream.
- Output cut off inside the block (max_tokens) leaves all of it as reasoning.

Run tool-call parsing (common/formats/tools.py) on the content stream, after this.
`split_reasoning(text)` is the same machine for a whole output.
"""

from __future__ import annotations

DEFAULT_START = "<think>"
DEFAULT_END = "</think>"
_WS = " \t\n\r"


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[len(text) - size :]):
            return size
    return 0


class ReasoningParser:
    """Splits streamed output into reasoning and content."""

    def __init__(
        self,
        start: str = DEFAULT_START,
        end: str = DEFAULT_END,
        *,
        starts_in_reasoning: bool = False,
    ) -> None:
        if not start or not end:
            raise ValueError("Reasoning markers must be non-empty strings.")
        self.start = start
        self.end = end
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._lead = starts_in_reasoning  # drop whitespace at the head of the current section
        self.saw_reasoning = starts_in_reasoning
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def feed(self, text: str) -> tuple[str, str]:
        """Consume text; returns (reasoning_delta, content_delta), either may be ""."""
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == "start":
                if not self._step_start(content):
                    break
            elif self._state == "reasoning":
                if not self._step_reasoning(reasoning):
                    break
            else:
                self._step_content(content)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the output."""
        held, self._buf = self._buf, ""
        if self._state == "reasoning":
            return held.rstrip(_WS), ""
        if self._state == "content" and self._lead:
            held = held.lstrip(_WS)
        return "", held

    # -- states: each returns True when the loop should go on ----------------------
    def _step_start(self, content: list[str]) -> bool:
        stripped = self._buf.lstrip(_WS)
        if stripped.startswith(self.start):
            self._buf = stripped[len(self.start) :]
            self._state, self._lead, self.saw_reasoning = "reasoning", True, True
            return True
        if self.start.startswith(stripped):  # nothing, whitespace or a partial marker so far
            return False
        self._state, self._lead = "content", False
        return True

    def _step_reasoning(self, reasoning: list[str]) -> bool:
        if self._lead:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return False
            self._lead = False
        pos = self._buf.find(self.end)
        if pos >= 0:
            reasoning.append(self._buf[:pos].rstrip(_WS))
            self._buf = self._buf[pos + len(self.end) :]
            self._state, self._lead = "content", True
            return True
        keep = len(self._buf) - _held_suffix(self._buf, self.end)
        emit = self._buf[:keep].rstrip(_WS)
        reasoning.append(emit)
        self._buf = self._buf[len(emit) :]
        return False

    def _step_content(self, content: list[str]) -> None:
        if self._lead:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return
            self._lead = False
        content.append(self._buf)
        self._buf = ""


def prompt_opens_reasoning(prompt: str, start: str = DEFAULT_START, end: str = DEFAULT_END) -> bool:
    """Whether a rendered prompt leaves a reasoning block open (so output starts inside it)."""
    opened = prompt.rfind(start)
    return opened >= 0 and prompt.rfind(end) < opened


def split_reasoning(
    text: str,
    start: str = DEFAULT_START,
    end: str = DEFAULT_END,
    *,
    starts_in_reasoning: bool = False,
) -> tuple[str | None, str]:
    """(reasoning, content) of a whole output; reasoning is None when there was no block."""
    parser = ReasoningParser(start, end, starts_in_reasoning=starts_in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2
