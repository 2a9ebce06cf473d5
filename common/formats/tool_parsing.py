"""Tool-call output parsing, streaming-safe; see `common/formats/tools.py` for the overview.

`ToolCallStreamParser` is a small state machine over the text as it arrives:
plain text (watching for the format's start marker) -> a tool-call region ->
one call object at a time (scanned char by char so the name is known as soon
as its string closes and arguments stream as they are written) -> separators
or the closing tag -> plain text again. Non-streaming parsing runs the same
machine over the whole text.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class ToolFormat(str, enum.Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"


HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
LLAMA3_TAG = "<|python_tag|>"
MISTRAL_START = "[TOOL_CALLS]"


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def arguments_object(self) -> Any:
        """Arguments decoded (Ollama wants an object); {} when they are not JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return {}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments_fragment: str


Delta = ContentDelta | ToolCallDelta


_WS = " \t\n\r"


class _CallScanner:
    """Scans one JSON call object `{"name": ..., "arguments": ...}` as its text arrives.

    Learns the name as soon as its string closes and hands out the raw text
    of the arguments value while it streams (a JSON-encoded string value is
    decoded and handed out whole when it closes).
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.done = False
        self.failed = False
        self.saw_arguments = False  # an arguments value started
        self._state = "start"
        self._key = ""
        self._raw: list[str] = []  # current key or value text
        self._kind = ""  # string | container | scalar
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._is_args = False
        self._args: list[str] = []

    def take_arguments(self) -> str:
        out = "".join(self._args)
        self._args.clear()
        return out

    def take_partial_string(self) -> str:
        """Arguments sent as a JSON-encoded string that was cut off: the text decoded so far."""
        if not (self._state == "value" and self._is_args and self._kind == "string"):
            return ""
        raw = "".join(self._raw)
        for end in range(len(raw), 0, -1):  # drop a half-written escape at the end
            try:
                return str(json.loads(raw[:end] + '"'))
            except ValueError:
                continue
        return ""

    def feed(self, text: str) -> int:
        """Consume text; returns how many characters belong to the object (all, unless it ended)."""
        for i, ch in enumerate(text):
            if not self._step(ch):
                self.failed = True
                return i
            if self.done:
                return i + 1
        return len(text)

    def _step(self, ch: str) -> bool:
        state = self._state
        if state == "value":
            return self._value_char(ch)
        if state == "key":
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                try:
                    self._key = json.loads('"' + "".join(self._raw) + '"')
                except ValueError:
                    return False
                self._state = "colon"
                return True
            self._raw.append(ch)
            return True
        if ch in _WS:
            return True
        if state == "start":
            self._state = "key_or_end"
            return ch == "{"
        if state == "key_or_end" and ch == '"':
            self._state, self._raw = "key", []
            return True
        if state in ("key_or_end", "after_value") and ch == "}":
            self.done = True
            return True
        if state == "after_value" and ch == ",":
            self._state = "key_or_end"
            return True
        if state == "colon" and ch == ":":
            self._state = "value_start"
            return True
        if state == "value_start":
            self._raw = [ch]
            self._is_args = self._key in ("arguments", "parameters") and not self.saw_arguments
            self.saw_arguments = self.saw_arguments or self._is_args
            self._kind = "string" if ch == '"' else "container" if ch in "{[" else "scalar"
            self._in_string, self._escape, self._depth = ch == '"', False, 1 if ch in "{[" else 0
            self._state = "value"
            if self._is_args and self._kind != "string":
                self._args.append(ch)
            return True
        return False

    def _value_char(self, ch: str) -> bool:
        kind = self._kind
        if kind == "scalar" and (ch in _WS or ch in ",}"):
            self._end_value()
            return self._step(ch)
        self._raw.append(ch)
        if self._is_args and kind != "string":
            self._args.append(ch)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if kind == "string":
                    self._end_value()
        elif kind == "container":
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._end_value()
        return True

    def _end_value(self) -> None:
        raw = "".join(self._raw)
        if self._key == "name" and self.name is None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            self.name = value if isinstance(value, str) else json.dumps(value)
        if self._is_args:
            if self._kind == "string":
                try:
                    self._args.append(json.loads(raw))
                except ValueError:
                    self._args.append(raw)
        self._is_args = False
        self._state = "after_value"


class ToolCallStreamParser:
    """Splits streamed model text into content and incremental tool calls."""

    def __init__(self, fmt: ToolFormat, tool_names: Iterable[str] | None = None) -> None:
        self.fmt = fmt
        self.tool_names = set(tool_names) if tool_names is not None else None
        self._marker = {
            ToolFormat.HERMES: HERMES_START,
            ToolFormat.LLAMA3: LLAMA3_TAG,
            ToolFormat.MISTRAL: MISTRAL_START,
        }[fmt]
        self._buf = ""
        self._mode = "text"  # text | region | call | after_call | close_tag
        self._seen_text = False  # non-whitespace content so far (llama3 bare JSON must come first)
        self._after_region = False  # drop whitespace right after tool calls
        self._array = False  # mistral: inside [...]
        self._region_raw = ""  # raw text of the current region/call, the content fallback
        self._region_calls = 0
        self._scanner: _CallScanner | None = None
        self._index = -1
        self._committed = False  # the current call's id and name were emitted
        self._pending: list[str] = []  # argument text seen before the name
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        while getattr(self, f"_step_{self._mode}")():
            pass
        return self._take()

    def finish(self) -> list[Delta]:
        """Flush held text at the end of the output.

        A call the output cut off (max_tokens) keeps exactly the argument text
        written so far; "{}" stands in only for a whole call that had no
        arguments.
        """
        if self._mode == "call":
            assert self._scanner is not None
            if self._committed:
                self._args(self._scanner.take_partial_string())
            self._end_call(cut=True)
        elif self._mode == "region" and self._region_calls == 0:
            self._content(self._region_raw + self._buf)
        elif self._mode == "text":
            self._content(self._buf)
        self._buf, self._mode = "", "text"
        return self._take()

    # -- emission ------------------------------------------------------------------
    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        merged: list[Delta] = []
        for d in out:
            if isinstance(d, ContentDelta) and merged and isinstance(merged[-1], ContentDelta):
                merged[-1] = ContentDelta(merged[-1].text + d.text)
            else:
                merged.append(d)
        return merged

    def _content(self, text: str) -> None:
        if text:
            self._seen_text = self._seen_text or bool(text.strip())
            self._out.append(ContentDelta(text))

    def _args(self, fragment: str) -> None:
        if fragment:
            self._out.append(ToolCallDelta(self._index, None, None, fragment))

    # -- states: each returns True when it made progress and the loop should go on --
    def _step_text(self) -> bool:
        if self._after_region:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return False
            self._after_region = False
        buf = self._buf
        if self.fmt is ToolFormat.LLAMA3 and not self._seen_text:
            stripped = buf.lstrip(_WS)
            if stripped.startswith("{"):
                self._enter_region(stripped, "")
                return True
        pos = buf.find(self._marker)
        if pos >= 0:
            self._content(buf[:pos].rstrip(_WS))
            self._enter_region(buf[pos + len(self._marker) :], self._marker)
            return True
        if self.fmt is ToolFormat.LLAMA3 and not self._seen_text and not buf.strip(_WS):
            return False  # only whitespace yet: a bare JSON call may still follow
        keep = len(buf) - _held_suffix(buf, self._marker)
        emit = buf[:keep].rstrip(_WS)
        self._content(emit)
        self._buf = buf[len(emit) :]
        return False

    def _enter_region(self, rest: str, raw: str) -> None:
        self._mode, self._buf = "region", rest
        self._region_raw, self._region_calls, self._array = raw, 0, False

    def _step_region(self) -> bool:
        stripped = self._buf.lstrip(_WS)
        self._region_raw += self._buf[: len(self._buf) - len(stripped)]
        self._buf = stripped
        if not stripped:
            return False
        opens_array = stripped[0] == "[" and not self._array and self._region_calls == 0
        if self.fmt is ToolFormat.MISTRAL and opens_array:
            self._array = True
            self._region_raw += "["
            self._buf = stripped[1:]
            return True
        if stripped[0] == "{":
            self._scanner, self._committed, self._pending = _CallScanner(), False, []
            self._mode = "call"
            return True
        self._fail_region()
        return True

    def _fail_region(self) -> None:
        """Not a tool call after all: the held text is content."""
        self._content(self._region_raw)
        self._seen_text = True
        self._region_raw, self._mode, self._scanner = "", "text", None

    def _step_call(self) -> bool:
        scanner = self._scanner
        assert scanner is not None
        used = scanner.feed(self._buf)
        self._region_raw += self._buf[:used]
        self._buf = self._buf[used:]
        if not self._committed and scanner.name is not None:
            if self.tool_names is not None and scanner.name not in self.tool_names:
                self._fail_region()
                return True
            self._index += 1
            self._committed = True
            self._out.append(ToolCallDelta(self._index, new_tool_call_id(), scanner.name, ""))
            self._args("".join(self._pending))
        fragment = scanner.take_arguments()
        if self._committed:
            self._args(fragment)
        else:
            self._pending.append(fragment)
        if scanner.failed or scanner.done:
            self._end_call()
            if self._mode == "call":
                self._mode = "after_call"
            return True
        return False

    def _end_call(self, *, cut: bool = False) -> None:
        scanner = self._scanner
        assert scanner is not None
        if not self._committed:  # never learnt a name: the region is plain text
            self._fail_region()
            return
        if not scanner.saw_arguments and not cut:
            self._args("{}")
        self._region_calls += 1
        self._scanner, self._committed, self._region_raw = None, False, ""

    def _step_after_call(self) -> bool:
        stripped = self._buf.lstrip(_WS)
        self._buf = stripped
        if not stripped:
            return False
        head = stripped[0]
        if self.fmt is ToolFormat.HERMES:
            self._mode = "close_tag"
        elif self.fmt is ToolFormat.MISTRAL and self._array and head == ",":
            self._buf, self._mode = stripped[1:], "region"
        elif self.fmt is ToolFormat.LLAMA3 and head in ";{":
            self._buf, self._mode = (stripped[1:] if head == ";" else stripped), "region"
        else:
            if self.fmt is ToolFormat.MISTRAL and self._array and head == "]":
                self._buf = stripped[1:]
            self._mode, self._seen_text, self._after_region = "text", True, True
        return True

    def _step_close_tag(self) -> bool:
        """Hermes: expect `</tool_call>`; a model that omits it goes straight on."""
        buf = self._buf
        if buf.startswith(HERMES_END):
            self._buf, self._mode, self._after_region = buf[len(HERMES_END) :], "text", True
            return True
        if HERMES_END.startswith(buf):
            return False  # a partial closing tag so far
        self._mode, self._seen_text = "text", True
        return True


def _held_suffix(text: str, *markers: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[len(text) - size :]):
                best = size
                break
    return best


def collect(deltas: Iterable[Delta]) -> tuple[str, list[ToolCall]]:
    """Assemble deltas into the content text and the tool calls."""
    content: list[str] = []
    heads: dict[int, tuple[str, str]] = {}
    arguments: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content.append(d.text)
            continue
        if d.id is not None and d.name is not None:
            heads[d.index] = (d.id, d.name)
        arguments.setdefault(d.index, []).append(d.arguments_fragment)
    calls = [ToolCall(heads[i][0], heads[i][1], "".join(arguments[i])) for i in sorted(heads)]
    return "".join(content), calls


def parse_tool_calls(
    text: str, fmt: ToolFormat, tool_names: Iterable[str] | None = None
) -> tuple[str, list[ToolCall]]:
    """Split a whole output into content and tool calls (same rules as streaming)."""
    parser = ToolCallStreamParser(fmt, tool_names)
    return collect(parser.feed(text) + parser.finish())
