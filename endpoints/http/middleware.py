"""The HTTP middleware every request passes: body size, request context, metrics, request log.

Pure ASGI (no BaseHTTPMiddleware), so streaming responses pass through
untouched and the request context (in request.state) lives for the whole response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loguru import logger

from common.errors import PayloadTooLargeError
from endpoints.http.deps import route_dialect
from endpoints.http.request_context import RequestContext, Services

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

QUIET_ROUTES = frozenset({"/health", "/metrics"})  # logged at DEBUG: probes and scrapers call them constantly


class BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label values); 'unmatched' for anything else."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


async def _read_bounded(receive: Receive, limit: int) -> list[Message]:
    """Read a body of unknown length (chunked) up to `limit` bytes; raise BodyTooLarge past it."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client left; the app will see the disconnect
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class ParleyMiddleware:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(self.services, scope)  # type: ignore[arg-type]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
            await send(message)

        ctx.attach()
        try:
            limit = self.services.config.network.max_request_body_bytes
            length = _header(scope, b"content-length")
            too_large = length is not None and length.strip().isdigit() and int(length) > limit
            if not too_large and length is None and _header(scope, b"transfer-encoding") is not None:
                try:
                    receive = _replay(await _read_bounded(receive, limit), receive)
                except BodyTooLarge:
                    too_large = True
            if too_large:
                await self._too_large(scope, send_status, limit)
            else:
                await self.app(scope, receive, send_status)
        except BaseException:
            ctx.status = ctx.status or 500
            raise
        finally:
            ctx.detach()
            ctx.close()
            self._record(ctx, scope)

    async def _too_large(self, scope: Scope, send: Send, limit: int) -> None:
        err = PayloadTooLargeError(
            f"The request body is larger than this server accepts ({limit} bytes, "
            "network.max_request_body_bytes). Send a smaller request."
        )
        body = json.dumps(err.body(route_dialect(scope).dialect)).encode()
        await send({
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})

    def _record(self, ctx: RequestContext, scope: Scope) -> None:
        elapsed = time.perf_counter() - ctx.started
        route = route_template(scope)
        status = ctx.status or 500
        metrics = self.services.metrics
        if metrics is not None:
            metrics.http_requests.labels(ctx.method, route, str(status)).inc()
            metrics.http_duration.labels(ctx.method, route).observe(elapsed)
        logs = self.services.config.logging
        if logs.log_requests:
            level = "DEBUG" if route in QUIET_ROUTES else "INFO"
            logger.log(level, request_line(ctx, route, status, elapsed, logs.log_generation_params,
                                           logs.log_prompt_chars if logs.log_prompt else None))


def request_line(
    ctx: RequestContext, route: str, status: int, elapsed: float, with_params: bool, prompt_chars: int | None
) -> str:
    """One log line: what was asked, by whom, how it ended, and what it cost."""
    parts = [f"{ctx.method} {ctx.path} -> {status} in {elapsed * 1000:.0f} ms", f"key {ctx.key_name}"]
    if route != ctx.path:
        parts.append(f"route {route}")
    if ctx.model is not None:
        parts.append(f"model {ctx.model}")
        parts.append(f"tokens {ctx.prompt_tokens} prompt + {ctx.completion_tokens} completion")
        if with_params and ctx.params is not None:
            params = ctx.params
            knobs = {name: getattr(params, name) for name in sorted(params.active_knobs() | {"max_tokens"})}
            parts.append(f"params {knobs}")
        if prompt_chars is not None and ctx.prompt_text is not None:
            text = ctx.prompt_text
            cut = text if len(text) <= prompt_chars else text[:prompt_chars] + f"... ({len(text)} chars)"
            parts.append(f"prompt {cut!r}")
    return ", ".join(parts)
