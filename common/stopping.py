"""Turn a stream of token bytes into safe text deltas.

`TextAssembler` owns two concerns every backend shares:
- UTF-8 that arrives split across tokens is held until the character is whole;
- text that might be the start of a stop string is held back until it is
  decided, so a client never sees part of a stop string.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass
class StopHit:
    text: str  # text before the stop string, not yet emitted
    stop: str  # the stop string that matched


class TextAssembler:
    __slots__ = ("_decoder", "_stops", "_pending", "_max_stop", "text_emitted")

    def __init__(self, stop: tuple[str, ...] | list[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.text_emitted = ""

    def feed(self, piece: bytes) -> str | StopHit:
        """Add one token's bytes; return the text now safe to emit, or a StopHit."""
        text = self._decoder.decode(piece)
        if not self._stops:
            self.text_emitted += text
            return text
        if not text:
            return ""
        buf = self._pending + text
        # A stop string can only newly appear in the tail that includes new text.
        search_from = max(0, len(self._pending) - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self._stops:
            idx = buf.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            before = buf[: best[0]]
            self._pending = ""
            self.text_emitted += before
            return StopHit(before, best[1])
        hold = self._held_suffix(buf)
        emit = buf[: len(buf) - hold]
        self._pending = buf[len(buf) - hold :]
        self.text_emitted += emit
        return emit

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = 0
        limit = min(len(buf), self._max_stop - 1)
        for s in self._stops:
            for n in range(min(limit, len(s) - 1), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """End of generation: release whatever was held back."""
        tail = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text_emitted += tail
        return tail
