"""What the server knows about the HTTP request being served: the generation and embedding hooks of its routes.

The HTTP middleware (endpoints/http/middleware.py) opens a `RequestContext`
for every request and leaves it in `request.state`; a route that generates
takes it with the `request_hooks` dependency and passes it to
`start_generation` (common/generation/pipeline.py), which calls it as its
`GenerationHooks`:

- `fit`: the per-request caps (prompt tokens, max tokens), naming the
  output-length field the route's dialect declares (`RouteDialect`);
- `admit` and `observe`: the `n` cap, refusal while draining, the rate
  limits, and an observed handle whose events feed the metrics (tokens, time
  to first token, inter-token latency) and charge the tokens generated to the
  caller's budget.

Embedding and rerank routes pass the same context to `embeddings.embed` /
`rerank` as their `EmbeddingHooks`: `admit` applies the same draining and
rate limits, and `embedded` counts the request and its input tokens in the
metrics and against the caller's token budget.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from backends.base import Event, Finished, FinishReason, GenerationHandle, TextDelta
from endpoints.http.auth import KeyEntry, Permission
from common.config.loader import ParleyConfig
from common.errors import BadRequestError, RateLimitError
from common.generation.hooks import EmbeddingHooks, GenerationHooks
from endpoints.http.deps import route_dialect
from endpoints.http.lifecycle import Lifecycle
from endpoints.http.metrics import Metrics
from endpoints.http.ratelimit import LimitStore, Limits, Subject
from backends.sampling import SamplingParams

STATE_KEY = "request_context"  # where the middleware leaves the context in request.state


@dataclass
class Services:
    """The per-app objects behind limits, metrics and shutdown (on app.state.services)."""

    config: ParleyConfig
    limiter: LimitStore
    lifecycle: Lifecycle
    metrics: Metrics | None

    def subject(self, key: KeyEntry | None, client: str) -> Subject:
        """Who a request is limited as: its key, or its client address when auth is off."""
        limits = self.config.limits
        default = Limits(limits.default_requests_per_minute, limits.default_tokens_per_minute)
        if key is None:
            return Subject(f"ip:{client}", client, default)
        if key.unlimited:
            return Subject(f"key:{key.fingerprint}", key.name, Limits())
        uses_default = key.permission is Permission.API
        return Subject(
            f"key:{key.fingerprint}",
            key.name,
            Limits(
                key.requests_per_minute or (default.requests_per_minute if uses_default else None),
                key.tokens_per_minute or (default.tokens_per_minute if uses_default else None),
            ),
        )


class RequestContext(GenerationHooks, EmbeddingHooks):
    """One HTTP request: its caller, its generations, and what the request log reports."""

    def __init__(self, services: Services, scope: dict[str, Any]) -> None:
        self.services = services
        self.scope = scope
        self.method: str = scope.get("method", "")
        self.path: str = scope.get("path", "")
        client = scope.get("client")
        self.client: str = client[0] if client else "unknown"
        self.started = time.perf_counter()
        self.status: int | None = None
        self.subject: Subject | None = None
        self.admitted = False
        self.handles: list[ObservedHandle] = []
        self.model: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_text: str | None = None
        self.params: SamplingParams | None = None

    # -- set by the middleware ------------------------------------------------
    def attach(self) -> None:
        """Leave this context in the request's state, where `request_hooks` finds it."""
        self.scope.setdefault("state", {})[STATE_KEY] = self

    def detach(self) -> None:
        state = self.scope.get("state")
        if isinstance(state, dict) and state.get(STATE_KEY) is self:
            del state[STATE_KEY]

    @property
    def key(self) -> KeyEntry | None:
        """The key the auth dependency accepted (it stores it in request.state)."""
        state = self.scope.get("state")
        return state.get("api_key") if isinstance(state, dict) else None

    @property
    def key_name(self) -> str:
        key = self.key
        if key is not None:
            return key.name
        return "-" if not self.services.config.network.disable_auth else f"ip:{self.client}"

    def close(self) -> None:
        """The response is sent: settle every generation's tokens and leave the running set."""
        for handle in self.handles:
            handle.settle()
        if self.admitted:
            self.services.lifecycle.end(self)

    # -- GenerationHooks: called by start_generation ----------------------------------
    def fit(self, n_prompt: int, prompt_param: str, requested: int | None) -> int | None:
        """Check the request's caps; return the ceiling for max_tokens (None: no ceiling)."""
        limits = self.services.config.limits
        if limits.max_prompt_tokens is not None and n_prompt > limits.max_prompt_tokens:
            raise BadRequestError(
                f"The prompt has {n_prompt} tokens; this server accepts at most {limits.max_prompt_tokens} "
                f"(limits.max_prompt_tokens). Shorten {prompt_param}.",
                param=prompt_param, code="prompt_too_long",
            )
        cap = limits.max_output_tokens
        if cap is not None and requested is not None and requested > cap:
            declared = route_dialect(self.scope)
            param, named = declared.max_tokens, declared.max_tokens_named or declared.max_tokens
            raise BadRequestError(
                f"{named} is {requested}; this server generates at most {cap} tokens per request "
                f"(limits.max_output_tokens). Send {param} <= {cap}.",
                param=param,
            )
        return cap

    def record_prompt(self, model: str, n_prompt: int, text: str | None, params: SamplingParams) -> None:
        self.model = model
        self.prompt_tokens += n_prompt
        if text is not None:
            self.prompt_text = text if self.prompt_text is None else self.prompt_text + "\n" + text
        self.params = params

    async def admit(self, n: int) -> None:
        """Before a generation is queued: the n cap, draining, then the caller's rate limits."""
        max_n = self.services.config.limits.max_n
        if max_n is not None and n > max_n:
            raise BadRequestError(
                f"n is {n}; this server generates at most {max_n} choices per request (limits.max_n). "
                f"Send n <= {max_n}, or several requests.",
                param="n",
            )
        if self.admitted:
            return  # a request with several prompts is admitted once
        services = self.services
        if services.lifecycle.draining:
            if services.metrics is not None:
                services.metrics.draining_refusals.inc()
            raise services.lifecycle.refusal()
        subject = services.subject(self.key, self.client)
        refusal = await services.limiter.admit(subject)
        if refusal is not None:
            if services.metrics is not None:
                services.metrics.rate_limited.labels(subject.name, refusal.kind.value).inc()
            err = RateLimitError(refusal.message(subject.name), headers={"Retry-After": str(refusal.retry_after)})
            err.type = refusal.kind.value  # OpenAI's 429: type "requests" or "tokens", code rate_limit_exceeded
            raise err
        self.subject = subject
        self.admitted = True
        services.lifecycle.begin(self)

    def observe(self, handle: GenerationHandle, model: str, *, counts_prompt: bool) -> ObservedHandle:
        observed = ObservedHandle(handle, self, model, counts_prompt=counts_prompt)
        self.handles.append(observed)
        return observed

    # -- EmbeddingHooks: called by embeddings.embed and rerank ---------------------------
    def embedded(self, model: str, input_tokens: int) -> None:
        """An embedding or rerank request ran: count it, and charge the tokens it read to the caller."""
        self.model = model
        self.prompt_tokens += input_tokens
        metrics = self.services.metrics
        if metrics is not None:
            metrics.embedding_requests.labels(model).inc()
            metrics.embedded_tokens.labels(model).inc(input_tokens)
        if self.subject is not None:
            self.services.limiter.charge(self.subject, input_tokens)

    def abort(self, message: str) -> None:
        """The server is shutting down: end this request's generations with an error."""
        for handle in self.handles:
            handle.abort(message)

    def charge(self, tokens: int) -> None:
        self.completion_tokens += tokens
        if self.subject is not None:
            self.services.limiter.charge(self.subject, tokens)


def request_hooks(request: Request) -> RequestContext:
    """FastAPI dependency: the request's context, to pass to start_generation (or embeddings.embed) as its hooks."""
    ctx = getattr(request.state, STATE_KEY, None)
    if not isinstance(ctx, RequestContext):
        raise RuntimeError(
            "No RequestContext on this request: the app was built without ParleyMiddleware. "
            "Build it with endpoints.app.create_app, or pass NO_HOOKS to start_generation outside HTTP."
        )
    return ctx


class ObservedHandle(GenerationHandle):
    """A generation handle whose events feed the metrics and the caller's token budget."""

    def __init__(self, inner: GenerationHandle, ctx: RequestContext, model: str, *, counts_prompt: bool) -> None:
        self.inner = inner
        self.request = inner.request
        self._ctx = ctx
        self._model = model
        self._counts_prompt = counts_prompt
        self._aborted: str | None = None
        self._generated = 0
        self._last: float | None = None
        self._itl: Any = None  # the inter-token histogram's child for this model, once the first token came
        self._settled = False

    async def events(self) -> AsyncIterator[Event]:
        metrics = self._ctx.services.metrics
        try:
            async with aclosing(self.inner.events()) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        self._tokens(len(ev.token_ids), metrics)
                        yield ev
                        continue
                    if self._aborted is not None and ev.reason is FinishReason.CANCELLED:
                        ev = Finished(FinishReason.ERROR, ev.usage, error=self._aborted)
                    self.settle(ev)
                    yield ev
        finally:
            self.settle()

    def _tokens(self, k: int, metrics: Metrics | None) -> None:
        if not k:
            return
        now = time.perf_counter()
        if metrics is not None:
            if self._last is None:
                metrics.ttft.labels(self._model).observe(now - self._ctx.started)
                self._itl = metrics.itl.labels(self._model)  # looked up once: labels() costs more than observe()
            else:
                gap = (now - self._last) / k
                itl = self._itl
                for _ in range(k):
                    itl.observe(gap)
        self._last = now
        self._generated += k

    def settle(self, finish: Finished | None = None) -> None:
        """Count the generation once: from its Finished usage, or the tokens seen when it never finished."""
        if self._settled:
            return
        self._settled = True
        tokens = finish.usage.completion_tokens if finish is not None else self._generated
        metrics = self._ctx.services.metrics
        if metrics is not None:
            metrics.generated_tokens.labels(self._model).inc(tokens)
            reason = finish.reason.value if finish is not None else "cancelled"
            metrics.generations.labels(self._model, reason).inc()
            if finish is not None and self._counts_prompt:
                metrics.prompt_tokens.labels(self._model).inc(finish.usage.prompt_tokens)
        self._ctx.charge(tokens)

    def abort(self, message: str) -> None:
        self._aborted = message
        self.inner.cancel()

    def cancel(self) -> None:
        self.inner.cancel()
