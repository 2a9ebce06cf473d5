"""Anthropic Messages API wire models: POST /v1/messages and /v1/messages/count_tokens.

The request carries Anthropic's fields (`system`, `messages` with content
blocks, `tools`, `tool_choice`, `thinking`, `stop_sequences`, `metadata`, `output_config.format`) and,
through the shared `SamplerFields`, every Parley sampler the OpenAI routes
accept (`min_p`, `repetition_penalty`, `json_schema`, ...), which the SDK
passes as `extra_body`. Content blocks stay plain dicts here: mapping.py reads
them one by one so an error names the exact block (`messages[2].content[1]`).
Unknown fields are accepted and logged by the router.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel
from endpoints.openai.protocol import SamplerFields

Block = dict[str, Any]


class InputMessage(BaseModel):
    """One turn: Anthropic has only user and assistant roles (the system prompt is a field of its own)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ThinkingConfig(WireModel):
    """`{"type": "enabled", "budget_tokens": N}` asks for thinking blocks; "disabled" turns them off."""

    model_config = ConfigDict(extra="allow")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class ToolChoice(BaseModel):
    """auto (the model decides), any (some tool must be called), tool (this `name`), none."""

    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1, max_length=200)
    disable_parallel_tool_use: bool | None = None


class PromptFields(BaseModel):
    """What both routes read to build the prompt."""

    model_config = ConfigDict(extra="allow")
    model: ModelName = Field(..., description="A model from GET /v1/models; with one model loaded any name answers.")
    messages: list[InputMessage] = Field(..., min_length=1)
    system: str | list[Block] | None = None
    tools: list[Block] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(PromptFields, SamplerFields):
    max_tokens: int = Field(..., ge=1, description="Required, as Anthropic requires it.")
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(PromptFields):
    pass
