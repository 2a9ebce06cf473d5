"""bench/sse_client.py: the benchmarks' streaming client reads chunked SSE however the bytes are split."""

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from sse_client import Sample, StreamError, _Stream, stream_completion  # noqa: E402

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
FRAMES = [
    b'data: {"choices":[{"text":" one"}]}\n\n',
    b'data: {"choices":[{"text":" two\\n\\n three"}]}\n\n',  # escaped newlines inside a frame's JSON
    b'data: {"choices":[{"text":"","finish_reason":"length"}]}\n\n',  # no text: not a token frame
    b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\n',
    b"data: [DONE]\n\n",
]


def chunked(frames: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"


class _Transport:
    def write(self, data: bytes) -> None:
        pass


def _feed(stream: bytes, step: int) -> Sample:
    loop = asyncio.new_event_loop()
    try:
        done: asyncio.Future[Sample] = loop.create_future()
        proto = _Stream(b"", done)
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        for i in range(0, len(stream), step):
            proto.data_received(stream[i : i + step])
        proto.connection_lost(None)
        return done.result()
    finally:
        loop.close()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 16, 61, 4096])
def test_frames_are_found_wherever_the_reads_split_them(step: int) -> None:
    sample = _feed(HEAD + chunked(FRAMES), step)
    assert sample.tokens == 3  # from the usage frame
    assert len(sample.gaps) == 1  # two frames with text
    assert sample.ttft >= 0


def test_several_frames_in_one_chunk_and_no_usage_count_frames() -> None:
    sample = _feed(HEAD + chunked([FRAMES[0] + FRAMES[1], FRAMES[4]]), 5)
    assert sample.tokens == 2


def test_a_body_cut_before_its_last_chunk_is_an_error() -> None:
    with pytest.raises(StreamError, match="closed the connection"):
        _feed(HEAD + chunked(FRAMES)[:-5], 64)


async def _serve(response: list[bytes]) -> tuple[asyncio.AbstractServer, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for part in response:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def test_a_real_socket_stream_is_timed_frame_by_frame() -> None:
    async def run() -> Sample:
        body = chunked(FRAMES)
        server, base = await _serve([HEAD, body[:40], body[40:90], body[90:]])
        async with server:
            return await stream_completion(base, {"prompt": "x", "stream": True})

    sample = asyncio.run(run())
    assert sample.tokens == 3
    assert len(sample.gaps) == 1 and sample.gaps[0] > 0


def test_an_error_status_raises_with_the_status() -> None:
    async def run() -> Sample:
        server, base = await _serve([b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"])
        async with server:
            return await stream_completion(base, {"prompt": "x", "stream": True})

    with pytest.raises(StreamError, match="HTTP 503"):
        asyncio.run(run())


def test_chat_frames_count_by_their_content() -> None:
    chat = [
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',  # role only: no token
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":" there"}}]}\n\n',
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    sample = _feed(HEAD + chunked(chat), 9)
    assert sample.tokens == 2 and len(sample.gaps) == 1
