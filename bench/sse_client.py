"""The benchmarks' streaming client: one POST over a raw asyncio connection, its SSE frames timed as they land.

The client shares the machine's cores with the servers it measures, and
whatever it spends per frame is taken from them in the middle of a decode. An
httpx client costs ~530 us of CPU per streamed frame (h11, line splitting,
JSON of every frame, a task wake-up per chunk); this one, an asyncio Protocol
that decodes the chunked body in place and parses only the usage frame, costs
a fraction of that, and the same for every server, so the figures are closer
to what a client on another machine would see.

Only what the serving benchmarks need: HTTP/1.1 to a loopback address, one
request per connection (`Connection: close`), a chunked or close-delimited
body of `data: ...` frames of /v1/completions (text in `"text"`) or
/v1/chat/completions (in `"content"`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class StreamError(Exception):
    """The server answered with an error status, or closed the connection before the stream ended."""


@dataclass
class Sample:
    ttft: float  # seconds from sending the request to the first frame with text
    gaps: list[float]  # seconds between consecutive frames with text
    tokens: int  # completion tokens (from the usage frame, else frames with text)


def _has_text(data: bytes) -> bool:
    """A completion frame with text, or a chat frame with content (not a role-only or finish frame)."""
    if b'"text":"' in data:
        return b'"text":""' not in data
    return b'"content":"' in data and b'"content":""' not in data


class _Stream(asyncio.Protocol):
    """Collects the timing of text frames of one streamed completion; `done` resolves at the end of the body."""

    def __init__(self, request: bytes, done: asyncio.Future[Sample]) -> None:
        self._request = request
        self._done = done
        self._raw = b""  # bytes not yet parsed (the head, then the chunked body's framing)
        self._head: bytes | None = None
        self._chunked = False
        self._need = -1  # bytes left in the current chunk; -1: a size line comes next
        self._body = b""  # decoded body not yet split into frames
        self._start = 0.0
        self._first: float | None = None
        self._last = 0.0
        self._gaps: list[float] = []
        self._frames = 0
        self._usage: int | None = None
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start = time.perf_counter()
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._raw += data
        if self._head is None:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head, self._raw = self._raw[:end], self._raw[end + 4 :]
            status = self._head.split(b" ", 2)
            if len(status) < 2 or status[1] != b"200":
                self._fail(f"HTTP {status[1].decode() if len(status) > 1 else '?'}: {self._head[:200]!r}")
                return
            self._chunked = b"transfer-encoding: chunked" in self._head.lower()
        if self._chunked:
            self._dechunk()
        else:
            self._body += self._raw
            self._raw = b""
        self._frames_at(now)

    def _dechunk(self) -> None:
        """Move whole chunk data from the raw bytes into the body; `_need`: bytes left in the current chunk,
        -2 while its closing CRLF is due, -1 while a size line is due."""
        raw = self._raw
        while not self._ended:  # after the last chunk only its trailer's CRLF comes: ignored
            if self._need > 0:
                take = raw[: self._need]
                self._body += take
                raw = raw[len(take) :]
                self._need -= len(take)
                if self._need > 0:
                    break
                self._need = -2
            if self._need == -2:
                if len(raw) < 2:
                    break
                raw, self._need = raw[2:], -1
            eol = raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(raw[:eol].split(b";")[0], 16)
            raw = raw[eol + 2 :]
            if size == 0:
                self._ended = True
                raw = b""
                break
            self._need = size
        self._raw = raw

    def _frames_at(self, now: float) -> None:
        *frames, self._body = self._body.split(b"\n\n")
        for frame in frames:
            at = frame.find(b"data: ")
            if at < 0:
                continue
            data = frame[at + 6 :]
            if b'"usage":{' in data:
                self._usage = json.loads(data)["usage"].get("completion_tokens")
            if not _has_text(data):
                continue
            if self._first is None:
                self._first = now
            else:
                self._gaps.append(now - self._last)
            self._last = now
            self._frames += 1

    def _fail(self, message: str) -> None:
        if not self._done.done():
            self._done.set_exception(StreamError(message))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if self._head is None or (self._chunked and not self._ended):
            self._fail(f"the server closed the connection mid-response ({exc or 'EOF'})")
            return
        first = self._first if self._first is not None else self._last or time.perf_counter()
        self._done.set_result(Sample(first - self._start, self._gaps, self._usage or self._frames))


async def stream_completion(base: str, body: dict[str, object], path: str = "/v1/completions",
                            timeout: float = 600.0) -> Sample:
    """POST `body` (with "stream": true) to base + path and time its frames; raises StreamError or OSError."""
    url = urlsplit(base)
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Sample] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Stream(request, done), url.hostname, url.port)
    try:
        return await asyncio.wait_for(done, timeout)
    finally:
        transport.close()
