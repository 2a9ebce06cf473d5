"""One error hierarchy for every dialect.

Routers and services raise `APIError`s; `endpoints/app.py` renders them in the
shape of the dialect the request's router declares (OpenAI envelope, KoboldAI
`detail`, Ollama `error` string, llama.cpp server's envelope with a numeric code, Anthropic's
`{"type": "error", "error": {...}}`). A mid-stream failure becomes the final frame
of that dialect's stream (see `endpoints/http/streaming.py`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Dialect(str, Enum):
    OPENAI = "openai"
    KOBOLD = "kobold"
    OLLAMA = "ollama"
    LLAMACPP = "llamacpp"
    ANTHROPIC = "anthropic"


class APIError(Exception):
    """A failure with a status, a machine-readable code and a helpful message.

    `message` should tell the user what to do next, not only what went wrong.
    `param` names the offending request field when there is one.
    """

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init_subclass__(
        cls, *, status: int | None = None, type: str | None = None, code: str | None = None, **kw: Any
    ) -> None:
        """A subclass sets its defaults in its header: `class X(APIError, status=..., type=..., code=...)`."""
        super().__init_subclass__(**kw)
        for name, value in (("status", status), ("type", type), ("code", code)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def kobold_body(self) -> dict[str, Any]:
        # KoboldCpp/KoboldAI clients read detail.msg and detail.type.
        return {"detail": {"msg": self.message, "type": self.code, "param": self.param}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def llamacpp_body(self) -> dict[str, Any]:
        # llama-server's envelope: the HTTP status as `code`, and its own error types; `param` added.
        kind = self.type
        if self.code == "context_length_exceeded":
            kind = "exceed_context_size_error"
        elif self.status == 404:
            kind = "not_found_error"
        elif self.status == 503:
            kind = "unavailable_error"
        return {"error": {"code": self.status, "message": self.message, "type": kind, "param": self.param}}

    def anthropic_body(self) -> dict[str, Any]:
        # Anthropic's envelope has no `param`: the message names the field instead.
        message = self.message
        if self.param and self.param not in message:
            message = f"{self.param}: {message}"
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, _anthropic_fallback(self.status)),
                                           "message": message}}

    def body(self, dialect: Dialect) -> dict[str, Any]:
        if dialect is Dialect.ANTHROPIC:
            return self.anthropic_body()
        if dialect is Dialect.LLAMACPP:
            return self.llamacpp_body()
        if dialect is Dialect.KOBOLD:
            return self.kobold_body()
        if dialect is Dialect.OLLAMA:
            return self.ollama_body()
        return self.openai_body()


# Anthropic's error types by HTTP status (its SDK picks the exception class from the status).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _anthropic_fallback(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


class BadRequestError(APIError, status=400, type="invalid_request_error", code="invalid_request"):
    """The request itself is wrong; `param` names the field."""


class ContextLengthExceededError(BadRequestError, code="context_length_exceeded"):
    """The prompt (with the output asked for) does not fit the model's context."""


class AuthenticationError(APIError, status=401, type="authentication_error", code="invalid_api_key"):
    """No key, or one the server does not know."""


class PermissionDeniedError(APIError, status=403, type="permission_error", code="insufficient_permissions"):
    """A known key without the permission the route needs."""


class NotFoundError(APIError, status=404, type="invalid_request_error", code="not_found"):
    """What the request names does not exist."""


class ModelNotFoundError(NotFoundError, code="model_not_found"):
    """No model of that name."""


class ConflictError(APIError, status=409, type="invalid_request_error", code="conflict"):
    """The request clashes with the current state."""


class PayloadTooLargeError(APIError, status=413, type="invalid_request_error", code="payload_too_large"):
    """The body is larger than the server takes."""


class ClientClosedError(APIError, status=499, type="invalid_request_error", code="client_closed_request"):
    """The client went away before the answer was ready (nginx's 499)."""


class RateLimitError(APIError, status=429, type="rate_limit_error", code="rate_limit_exceeded"):
    """Too many requests: over the caller's budget, or an upstream's limit."""


class ServiceUnavailableError(APIError, status=503, type="server_error", code="service_unavailable"):
    """Busy, loading, draining or no model: the client may retry."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        if retry_after is not None:
            self.headers.setdefault("Retry-After", str(max(1, int(round(retry_after)))))


MODEL_RETRY_SECONDS = 2  # Retry-After on a 503 for a model that is loading, unloading or unloaded


class ModelNotLoadedError(ServiceUnavailableError, code="model_not_loaded"):
    """The model the request needs is not loaded (not yet, or not any more).

    As a 503 it always carries `Retry-After` (MODEL_RETRY_SECONDS unless told), whichever route raised it:
    a load may be under way, or the next request may load the model again. Raised with another status
    (an admin's unload of a model that is not loaded: 400) it carries none.
    """

    def __init__(self, message: str, *, retry_after: float | None = MODEL_RETRY_SECONDS, **kw: Any) -> None:
        status = kw.get("status")
        super().__init__(message, retry_after=retry_after if status in (None, 503) else None, **kw)


class EngineError(APIError, status=500, type="server_error", code="engine_error"):
    """The engine failed while serving a request (not the client's fault)."""

