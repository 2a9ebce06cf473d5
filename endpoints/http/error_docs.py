"""The error bodies each dialect answers with, declared in the OpenAPI schema.

`common/errors.py` renders every failure in its dialect's shape; these models
document those shapes so the schema tells clients (and schema-driven test
tools) what a 4xx or 5xx looks like, instead of FastAPI's default 422
`HTTPValidationError`, which this server never sends.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from common.errors import Dialect


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do next.")
    type: str
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error envelope (also used by the admin routes)."""

    error: OpenAIErrorDetail


class LlamaCppErrorDetail(BaseModel):
    code: int = Field(description="The HTTP status.")
    message: str = Field(description="What went wrong and what to do next.")
    type: str
    param: str | None = Field(None, description="The request field at fault, when there is one.")


class LlamaCppErrorBody(BaseModel):
    """llama.cpp server's error envelope: `code` is the HTTP status."""

    error: LlamaCppErrorDetail


class KoboldErrorDetail(BaseModel):
    msg: str = Field(description="What went wrong and what to do next.")
    type: str
    param: str | None = None


class KoboldErrorBody(BaseModel):
    """KoboldAI's `detail` object, as KoboldCpp clients read it."""

    detail: KoboldErrorDetail


class OllamaErrorBody(BaseModel):
    """Ollama's error: one message string."""

    error: str


class AnthropicErrorDetail(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...")
    message: str = Field(description="What went wrong (naming the field) and what to do next.")


class AnthropicErrorBody(BaseModel):
    """Anthropic's error envelope."""

    type: str = Field("error")
    error: AnthropicErrorDetail


_MODELS: dict[Dialect, type[BaseModel]] = {
    Dialect.OPENAI: OpenAIErrorBody,
    Dialect.KOBOLD: KoboldErrorBody,
    Dialect.OLLAMA: OllamaErrorBody,
    Dialect.LLAMACPP: LlamaCppErrorBody,
    Dialect.ANTHROPIC: AnthropicErrorBody,
}


def error_responses(dialect: Dialect) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router: every 4xx and 5xx comes in `dialect`'s error shape."""
    model = _MODELS[dialect]
    return {
        "4XX": {"model": model, "description": "A client error: the message names the field and the fix."},
        "5XX": {"model": model, "description": "Busy, loading or failed; 503 carries Retry-After."},
    }
