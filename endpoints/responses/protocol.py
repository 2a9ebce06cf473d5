"""Wire models for /v1/responses and /v1/conversations.

A Responses request also takes the TabbyAPI sampler set (as chat completions
do); `input`, `tools` and `text` are checked by items.py and mapping.py, so
their errors name the exact item.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.openai.protocol import SamplerFields


class ResponsesRequest(SamplerFields):
    model: ModelName | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool = True
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: list[Any] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = None


class ConversationUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, str] | None = None


class ItemsCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: list[Any] = Field(..., min_length=1, max_length=20)
