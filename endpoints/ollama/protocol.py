"""Ollama wire models (https://github.com/ollama/ollama/blob/main/docs/api.md).

Unknown fields and options are accepted and logged, never rejected: Ollama
clients send many. A field of the wrong type is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel

# Durations as Ollama clients send them: seconds (number) or a Go duration ("5m", "0s", "-1").
KeepAlive = float | int | str | None


class Options(WireModel):
    """The `options` object; None = not sent (Ollama's default applies)."""

    model_config = ConfigDict(extra="allow")

    num_predict: int | None = Field(None, ge=-2, description="Tokens to generate; -1 = no limit, -2 = fill the context.")
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    num_ctx: int | None = None
    num_keep: int | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    tfs_z: float | None = None
    penalize_newline: bool | None = None
    # Load-time settings in Ollama; here they belong to the server config.
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None


LOAD_TIME_OPTIONS = (
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
)


class _Request(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    # Older clients send `name`; Ollama accepts both.
    model: ModelName = Field("", validation_alias=AliasChoices("model", "name"))


class _GenerationRequest(_Request):
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class GenerateRequest(_GenerationRequest):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class ShowRequest(_Request):
    verbose: bool = False


class EmbedRequest(_Request):
    input: Any = None  # a string or a list of strings; checked in common/generation/embeddings.py
    prompt: Any = None  # /api/embeddings (the older route)
    truncate: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None


class PullRequest(_Request):
    insecure: bool = False
    stream: bool = True
