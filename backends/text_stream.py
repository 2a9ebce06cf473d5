"""Turn sampled tokens into safe text: stop strings, banned strings, whole UTF-8.

`TokenTextStream` is shared by every backend. Text is released a token at a
time, and only when it is decided:
- UTF-8 that arrives split across tokens waits until the character is whole;
- text that might be the start of a stop string or a banned string is held
  back, so a client never sees part of either;
- a completed stop string ends the output (`StopHit`); stop strings match
  case-sensitively;
- a completed banned string asks the engine to rewind (`Rewind`): drop the
  tokens from the one where the banned string starts, and sample that
  position again with that token banned. Because partial matches are held
  back, the tokens to drop are never ones already sent. Banned strings match
  ignoring case, as exllamav2/v3 and KoboldCpp do ("cat" bans "Cat", "CAT").
"""

from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from backends.base import TextDelta, TokenLogprob


class Release(NamedTuple):  # a tuple: made once per token, so it is kept cheap to build
    text: str
    tokens: tuple[int, ...]  # tokens whose text this is (in order)


@dataclass(frozen=True)
class StopHit:
    release: Release  # decided text before the stop string
    stop: str


@dataclass(frozen=True)
class Rewind:
    n_tokens: int  # how many of the latest tokens to drop
    banned_token: int  # the first dropped token: ban it at that position
    banned: str


def _decode(data: bytes) -> tuple[str, int]:
    """Decode the complete UTF-8 prefix of data; returns (text, bytes consumed)."""
    text, used = codecs.utf_8_decode(data, "replace", False)
    return text, used


_SIGMA = str.maketrans("ς", "σ")


def fold_case(text: str) -> str:
    """Lowercase text keeping its length, so an index in the result is one in text.

    `str.lower` maps a few characters to two ("İ" -> "i̇"); those are kept as
    they are. Final sigma becomes plain sigma, so a word matches in any position.
    """
    low = text.lower()
    if len(low) != len(text):
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    return low.translate(_SIGMA)


def _earliest(text: str, needles: tuple[str, ...]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in needles:
        idx = text.find(s)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


class TokenTextStream:
    __slots__ = ("_stops", "_banned", "_banned_folded", "_watch", "_max_watch", "_pending", "text_emitted")

    def __init__(self, stop: tuple[str, ...] | list[str] = (), banned: tuple[str, ...] | list[str] = ()) -> None:
        self._stops = tuple(s for s in stop if s)
        self._banned = tuple(s for s in banned if s)
        # Folded once here; the pending text is folded on each push that has bans.
        self._banned_folded = tuple(fold_case(s) for s in self._banned)
        self._watch = self._stops + self._banned
        self._max_watch = max((len(s) for s in self._watch), default=0)
        self._pending: list[tuple[int, bytes]] = []
        self.text_emitted = ""

    @property
    def pending_tokens(self) -> int:
        return len(self._pending)

    def push(self, token: int, piece: bytes) -> Release | StopHit | Rewind:
        self._pending.append((token, piece))
        if not self._watch and len(self._pending) == 1:
            text, used = _decode(piece)
            if used == len(piece):  # the common case: one whole token, nothing to watch
                self._pending.clear()
                self.text_emitted += text
                return Release(text, (token,))
        data = b"".join(p for _, p in self._pending)
        text, used = _decode(data)
        complete = used == len(data)
        found = _earliest(text, self._stops)
        if found is not None:
            return StopHit(self._release_chars(found[0], text), found[1])
        folded = fold_case(text) if self._banned else text
        found = _earliest(folded, self._banned_folded)
        if found is not None:
            k = self._token_at_char(found[0])
            dropped = self._pending[k:]
            del self._pending[k:]
            return Rewind(len(dropped), dropped[0][0], self._banned[self._banned_folded.index(found[1])])
        hold = self._held_suffix(text, folded)
        return self._release_upto(len(text) - hold, text, complete and hold == 0)

    def _token_at_char(self, char_index: int) -> int:
        """Index in pending of the token whose text contains char_index."""
        acc = b""
        for i, (_, piece) in enumerate(self._pending):
            acc += piece
            if len(_decode(acc)[0]) > char_index:
                return i
        return len(self._pending) - 1

    def _release_upto(self, n_chars: int, text: str, everything: bool) -> Release:
        """Release the longest run of leading pending tokens whose text lies within n_chars."""
        if everything:
            tokens = tuple(t for t, _ in self._pending)
            self._pending.clear()
            self.text_emitted += text
            return Release(text, tokens)
        acc = b""
        cut = 0
        released = ""
        for i, (_, piece) in enumerate(self._pending):
            acc += piece
            t, used = _decode(acc)
            if used != len(acc) or len(t) > n_chars:
                break
            cut, released = i + 1, t
        tokens = tuple(t for t, _ in self._pending[:cut])
        del self._pending[:cut]
        self.text_emitted += released
        return Release(released, tokens)

    def _release_chars(self, n_chars: int, text: str) -> Release:
        """Stop: release exactly the first n_chars of pending text, drop the rest."""
        tokens = tuple(t for t, _ in self._pending)
        self._pending.clear()
        released = text[:n_chars]
        self.text_emitted += released
        return Release(released, tokens)

    def _held_suffix(self, text: str, folded: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a watched string.

        Stop strings are compared with text, banned strings (folded) with folded text.
        """
        longest = 0
        limit = min(len(text), self._max_watch - 1)
        for haystack, needles in ((text, self._stops), (folded, self._banned_folded)):
            for s in needles:
                for n in range(min(limit, len(s) - 1), longest, -1):
                    if haystack.endswith(s[:n]):
                        longest = n
                        break
        return longest

    def flush(self) -> Release:
        """End of output: release whatever is held (a partial match is not a match)."""
        data = b"".join(p for _, p in self._pending)
        tokens = tuple(t for t, _ in self._pending)
        self._pending.clear()
        text = data.decode("utf-8", "replace")
        self.text_emitted += text
        return Release(text, tokens)


def text_delta(release: Release, pending_logprobs: deque[TokenLogprob]) -> TextDelta | None:
    """The event for a release, with its tokens' logprobs taken from the front of `pending_logprobs`
    (one per token, when logprobs were asked for); None when nothing was released."""
    if not release.tokens and not release.text:
        return None
    lps: tuple[TokenLogprob, ...] = ()
    if pending_logprobs:
        lps = tuple(pending_logprobs.popleft() for _ in release.tokens if pending_logprobs)
    return TextDelta(release.text, release.tokens, lps)
