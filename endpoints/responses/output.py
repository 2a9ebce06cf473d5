"""A generation's output as Responses output items, with the stream events that announce them.

One `OutputBuilder` per response: `feed` takes the split deltas of the shared
output parser (reasoning, text, tool calls) and opens, fills and closes
`reasoning`, `message` and `function_call` items, returning the typed SSE
frames (`response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`, `response.function_call_arguments.delta`, ...)
with their sequence numbers. A non-streaming response drops the frames and
keeps the items.
"""

from __future__ import annotations

from typing import Any

from common.formats.output import ChatDeltas
from common.store.ids import new_id
from endpoints.http.streaming import dumps


class OutputBuilder:
    def __init__(self, output: list[dict[str, Any]]) -> None:
        self.output = output
        self.seq = 0
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {dumps(body)}\n\n"

    @property
    def index(self) -> int:
        return len(self.output) - 1

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [i for i in self.output if i["type"] == "function_call"]

    @property
    def text(self) -> str:
        return "".join(p["text"] for i in self.output if i["type"] == "message" for p in i["content"])

    def _start(self, item: dict[str, Any]) -> list[str]:
        frames = self.close()
        self.output.append(item)
        self._open = item
        self._text = []
        frames.append(self.event("response.output_item.added", output_index=self.index, item=dict(item)))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            frames.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.index,
                                     content_index=0, part=part))
        return frames

    def close(self, *, ensure_message: bool = False) -> list[str]:
        """Finish the open item (its `.done` events); `ensure_message`: an empty output gets one empty message."""
        if ensure_message and not self.output:
            return self._start({"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                                "content": []}) + self.close()
        item, self._open = self._open, None
        if item is None:
            return []
        text = "".join(self._text)
        where = {"item_id": item["id"], "output_index": self.index}
        frames = []
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            frames.append(self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            frames.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        elif item["type"] == "reasoning":
            frames.append(self.event("response.reasoning_text.done", **where, content_index=0, text=text))
            item["content"] = [{"type": "reasoning_text", "text": text}]
        else:
            item["arguments"] = text
            frames.append(self.event("response.function_call_arguments.done", **where, arguments=text,
                                     name=item["name"]))
        if item["type"] != "reasoning":
            item["status"] = "completed"
        frames.append(self.event("response.output_item.done", output_index=self.index, item=item))
        return frames

    def feed(self, d: ChatDeltas) -> list[str]:
        frames: list[str] = []
        if d.reasoning:
            if self._open is None or self._open["type"] != "reasoning":
                frames += self._start({"type": "reasoning", "id": new_id("rs"), "summary": [], "content": []})
            self._text.append(d.reasoning)
            frames.append(self.event("response.reasoning_text.delta", item_id=self._open["id"],  # type: ignore[index]
                                     output_index=self.index, content_index=0, delta=d.reasoning))
        if d.content:
            if self._open is None or self._open["type"] != "message":
                frames += self._start({"type": "message", "id": new_id("msg"), "status": "in_progress",
                                       "role": "assistant", "content": []})
            self._text.append(d.content)
            frames.append(self.event("response.output_text.delta", item_id=self._open["id"],  # type: ignore[index]
                                     output_index=self.index, content_index=0, delta=d.content, logprobs=[]))
        for call in d.tool_calls:
            if call.name is not None:
                frames += self._start({"type": "function_call", "id": new_id("fc"), "status": "in_progress",
                                       "call_id": call.id, "name": call.name, "arguments": ""})
            if call.arguments_fragment and self._open is not None and self._open["type"] == "function_call":
                self._text.append(call.arguments_fragment)
                frames.append(self.event("response.function_call_arguments.delta", item_id=self._open["id"],
                                         output_index=self.index, delta=call.arguments_fragment))
        return frames
