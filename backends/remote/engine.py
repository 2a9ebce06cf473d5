"""RemoteEngine: the Engine contract in front of upstream servers, so remote models take the one pipeline.

Chat prompts go to the upstream's chat endpoint as messages (the upstream holds
the model's own template and tool-call parser, which Parley cannot know without
the model's files); text prompts go to its completions endpoint as text.
Parley has no vocabulary for a remote model: its "tokens" are the prompt's
UTF-8 bytes, which measure the prompt for Parley's caps and are never sent;
the upstream's own usage counts are what rate limits and metrics charge.

Each request runs in a reader task (cancel() ends it; that closes the
upstream connection, so the upstream frees its slot) that tries replicas in
routing order: a connection error, a closed pooled connection or a 5xx before
the first byte moves on to another replica; after the first byte a failure
ends the stream with an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

from backends.base import (
    Engine,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    ModelInfo,
    ReplicaStats,
    TextDelta,
    Usage,
)
from backends.remote.health import HealthChecker
from backends.remote.replicas import Replica, ReplicaPool
from backends.remote.spec import RemoteSpec
from backends.remote.wire import AnswerReader, Piece, UpstreamCall, build_call, upstream_error
from backends.text_stream import Release, Rewind, StopHit, TokenTextStream
from common.errors import ServiceUnavailableError

BYTES_PER_TOKEN = 8  # Parley counts a remote prompt in bytes; the upstream's own check is exact
NO_TOKEN = -1  # a delta's "token id" for metrics: one per upstream chunk (usually one token)
_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.STOP,
            "eos": FinishReason.STOP, "function_call": FinishReason.STOP}


class _Retry(Exception):
    """This replica failed before the first byte: try another."""


class RemoteEngine(Engine):
    compiles_constraints = False
    knows_vocabulary = False

    def __init__(self, spec: RemoteSpec, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.spec = spec
        self.renders_chat = spec.chat
        self.info = ModelInfo(
            name=spec.name, path=", ".join(spec.replicas), backend="remote", n_ctx=spec.context_length * BYTES_PER_TOKEN,
            n_ctx_train=spec.context_length, n_vocab=256, bos_token="", eos_token="", bos_token_id=-1,
            eos_token_id=-1, add_bos_token=False, chat_template=None,
            load_options={"kind": spec.kind, "server": spec.server, "replicas": list(spec.replicas),
                          "upstream_model": spec.upstream_model, "routing": spec.routing},
            architecture=f"remote ({spec.kind})",
        )
        self.pool = ReplicaPool(spec.replicas, spec.routing, spec.max_inflight, spec.eject_seconds,
                                spec.affinity_prefix_chars, spec.affinity_load_factor)
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers, transport=transport,
            timeout=httpx.Timeout(spec.read_timeout, connect=spec.connect_timeout, pool=spec.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.health = HealthChecker(self.pool, self.client, spec.health_path, spec.health_interval)
        self._handles: set[RemoteHandle] = set()
        self._finished = 0
        self._generated = 0

    async def start(self) -> None:
        """Check every replica once, then keep checking in the background."""
        await self.health.check_all()
        self.health.start()

    # -- the byte "vocabulary" ----------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", "replace")

    def token_piece(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else b""

    # -- requests --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if not self.pool.candidates():
            raise ServiceUnavailableError(
                f"No replica of '{self.spec.name}' can take a request now (all are down, cooling down after "
                f"errors, or at max_inflight {self.spec.max_inflight}). Retry in a few seconds.",
                retry_after=self.pool.retry_after(), code="no_replica",
            )
        params = request.params
        room = self.info.n_ctx - len(request.prompt_tokens)
        # max_tokens equal to the whole room means the request set none: let the upstream decide.
        max_tokens = params.max_tokens if params.max_tokens is not None and params.max_tokens < room else None
        call = build_call(self.spec, request, max_tokens)
        handle = RemoteHandle(self, request, call)
        self._handles.add(handle)
        return handle

    def stats(self) -> EngineStats:
        active = sum(r.in_flight for r in self.pool.replicas)
        return EngineStats(slots_total=self.spec.max_inflight * len(self.pool.replicas), slots_active=active,
                           queue_depth=0, kv_cells_total=0, kv_cells_used=0, requests_finished=self._finished,
                           tokens_generated=self._generated)

    def replica_stats(self) -> list[ReplicaStats]:
        return self.pool.stats()

    def done(self, handle: RemoteHandle, usage: Usage) -> None:
        self._handles.discard(handle)
        self._finished += 1
        self._generated += usage.completion_tokens

    async def close(self) -> None:
        for handle in list(self._handles):
            handle.cancel(FinishReason.UNLOAD)
        await self.health.stop()
        await self.client.aclose()


class RemoteHandle(GenerationHandle):
    def __init__(self, engine: RemoteEngine, request: GenerationRequest, call: UpstreamCall) -> None:
        self.engine = engine
        self.request = request
        self.call = call
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._cancelled: FinishReason | None = None
        self.usage = Usage()

    async def events(self) -> AsyncIterator[Event]:
        if self._cancelled is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"remote {self.request.request_id}")
        else:
            self._queue.put_nowait(Finished(self._cancelled, self.usage))
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if self._task is not None and not self._task.done():
                if self._cancelled is None:
                    self._cancelled = FinishReason.CANCELLED
                    self._task.cancel()
                # Once: a second cancel would interrupt the reader closing its upstream connection.
                await asyncio.shield(asyncio.gather(self._task, return_exceptions=True))
            self.engine.done(self, self.usage)

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        if self._cancelled is not None:
            return
        self._cancelled = reason
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self._queue.put_nowait(Finished(reason, self.usage))

    # -- the reader task ---------------------------------------------------------------------
    async def _run(self) -> None:
        started = time.perf_counter()
        try:
            finish = await self._try_replicas()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader must always end its stream
            finish = Finished(FinishReason.ERROR, self.usage, error=f"The remote request failed: {exc!r}. Retry it.")
        self.usage.generation_seconds = time.perf_counter() - started
        self._queue.put_nowait(finish)

    async def _try_replicas(self) -> Finished:
        engine, pool, spec = self.engine, self.engine.pool, self.engine.spec
        tried: set[int] = set()
        errors: list[str] = []
        reconnects = 0
        while len(tried) <= spec.retries:
            replica = pool.pick(self.request.affinity_key, tried)
            if replica is None:
                break
            try:
                return await self._stream(replica)
            except _Retry as why:
                errors.append(str(why))
                if "closed the connection" in str(why) and reconnects < 2:
                    reconnects += 1  # a kept-alive connection the upstream had closed: same replica again
                    continue
                tried.add(replica.index)
        detail = "; ".join(errors) or "no replica is up"
        return Finished(FinishReason.ERROR, self.usage, error_status=503, error=(
            f"No replica of '{spec.name}' could answer ({detail}). Retry in a few seconds."))

    async def _stream(self, replica: Replica) -> Finished:
        """One attempt on one replica. Raises _Retry while nothing has reached the client."""
        pool, call = self.engine.pool, self.call
        params = self.request.params
        text = TokenTextStream(params.stop, params.banned_strings)
        reader = AnswerReader(call.chat, call.ndjson)
        sent = False
        pool.begin(replica)
        asked = time.perf_counter()
        try:
            request = self.engine.client.build_request("POST", replica.url + call.path, json=call.body)
            response = await self.engine.client.send(request, stream=True)
            async with _closing(response):
                if response.status_code >= 400:
                    raw = await response.aread()
                    message = upstream_error(response.status_code, raw)
                    if response.status_code >= 500 or response.status_code == 429:
                        pool.fail(replica)
                        raise _Retry(f"{replica.url} answered {response.status_code}: {message}")
                    if response.status_code in (401, 403):  # the operator's key, not the client's
                        return Finished(FinishReason.ERROR, self.usage, error_status=502, error=(
                            f"The upstream server {replica.url} refused Parley's API key ({message}). The operator "
                            "should check the variable named by api_key_env."))
                    return Finished(FinishReason.ERROR, self.usage, error_status=response.status_code,
                                    error=f"The upstream server refused the request: {message}")
                pool.first_byte(replica, time.perf_counter() - asked)
                reason: FinishReason | None = None
                async for data in _documents(response, call.ndjson):
                    piece = reader.read(data)
                    self._count(piece)
                    outcome = self._push(text, piece)
                    if isinstance(outcome, Finished):
                        return outcome
                    if outcome:
                        sent = True
                    if piece.finish is not None:
                        reason = _REASONS.get(piece.finish, FinishReason.STOP)
                        if call.ndjson:
                            break
                        # OpenAI servers send the usage in one more chunk after the finish.
                if reason is None:
                    raise httpx.RemoteProtocolError("the upstream ended the stream without finishing the answer")
                return self._finish(text, reason)
        except _Retry:
            raise
        except (httpx.TransportError, httpx.DecodingError) as exc:
            closed = isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc)
            if not sent:
                if closed:
                    raise _Retry(f"{replica.url} closed the connection") from None
                pool.fail(replica)
                raise _Retry(f"{replica.url}: {type(exc).__name__} {exc}") from None
            pool.fail(replica)
            return Finished(FinishReason.ERROR, self.usage, error=(
                f"The upstream server {replica.url} failed mid-answer ({type(exc).__name__}: {exc}). "
                "Retry the request; it will go to another replica."))
        finally:
            pool.end(replica)

    def _count(self, piece: Piece) -> None:
        if piece.prompt_tokens is not None:
            self.usage.prompt_tokens = piece.prompt_tokens
            self.usage.cached_tokens = piece.cached_tokens
        if piece.completion_tokens is not None:
            self.usage.completion_tokens = piece.completion_tokens
        elif piece.text:
            self.usage.completion_tokens += max(1, len(piece.logprobs))

    def _push(self, text: TokenTextStream, piece: Piece) -> bool | Finished:
        """Queue what is decided of a piece's text; a Finished when Parley's stop or ban ended it."""
        if not piece.text:
            return False
        pieces = [piece.text] if not (self.request.params.stop or self.request.params.banned_strings) \
            else list(piece.text)  # one character at a time: a match cuts exactly where it starts
        released: list[str] = []
        for part in pieces:
            outcome = text.push(NO_TOKEN, part.encode("utf-8"))
            if isinstance(outcome, Release):
                released.append(outcome.text)
                continue
            if isinstance(outcome, StopHit):
                released.append(outcome.release.text)
                self._emit("".join(released), piece)
                return Finished(FinishReason.STOP, self.usage, stop_string=outcome.stop)
            assert isinstance(outcome, Rewind)
            released.append(text.flush().text)
            self._emit("".join(released), piece)
            return Finished(FinishReason.STOP, self.usage)
        return self._emit("".join(released), piece)

    def _emit(self, out: str, piece: Piece) -> bool:
        if not out and not piece.logprobs:
            return False
        n = max(1, len(piece.logprobs))
        self._queue.put_nowait(TextDelta(out, (NO_TOKEN,) * n, piece.logprobs))
        return True

    def _finish(self, text: TokenTextStream, reason: FinishReason) -> Finished:
        rest = text.flush().text
        if rest:
            self._queue.put_nowait(TextDelta(rest, (NO_TOKEN,)))
        return Finished(reason, self.usage)


class _closing:
    """Close an upstream answer on the way out, even when the reader is being cancelled: an answer left
    open keeps the upstream generating for a client that has gone."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def __aenter__(self) -> httpx.Response:
        return self.response

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.response.aclose())


async def _documents(response: httpx.Response, ndjson: bool) -> AsyncIterator[dict]:
    """The JSON documents of a server-sent-events or newline-delimited JSON answer."""
    async for line in response.aiter_lines():
        line = line.strip()
        if not line:
            continue
        if not ndjson:
            if not line.startswith("data:"):
                continue
            line = line[5:].strip()
            if line == "[DONE]":
                continue  # read on to the end of the body, so the connection goes back to the pool
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            if "error" in data and not data.get("choices"):
                message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
                raise httpx.RemoteProtocolError(f"the upstream sent an error mid-answer: {message}")
            yield data
