"""Wire models for the Assistants API v2 (assistants, threads, messages, runs), as the openai SDK's beta
client sends them. Unknown fields are accepted and logged, as on every OpenAI route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class AssistantCreate(_Body):
    model: ModelName | None = None
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=512)
    instructions: str | None = Field(None, max_length=256_000)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    metadata: dict[str, str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    response_format: str | dict[str, Any] | None = None
    tool_resources: dict[str, Any] | None = None


class MessageCreate(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]
    attachments: list[Any] | None = None
    metadata: dict[str, str] | None = None


class ThreadCreate(_Body):
    messages: list[MessageCreate] | None = None
    metadata: dict[str, str] | None = None
    tool_resources: dict[str, Any] | None = None


class ThreadUpdate(_Body):
    metadata: dict[str, str] | None = None
    tool_resources: dict[str, Any] | None = None


class MessageUpdate(_Body):
    metadata: dict[str, str] | None = None


class TruncationStrategy(BaseModel):
    type: Literal["auto", "last_messages"] = "auto"
    last_messages: int | None = Field(None, ge=1)


class RunCreate(_Body):
    assistant_id: str
    model: ModelName | None = None
    instructions: str | None = None
    additional_instructions: str | None = None
    additional_messages: list[MessageCreate] | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    truncation_strategy: TruncationStrategy | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: str | dict[str, Any] | None = None


class ThreadAndRunCreate(RunCreate):
    thread: ThreadCreate | None = None


class ToolOutput(BaseModel):
    tool_call_id: str
    output: str


class SubmitToolOutputs(_Body):
    tool_outputs: list[ToolOutput] = Field(..., min_length=1)
    stream: bool = False


class RunUpdate(_Body):
    metadata: dict[str, str] | None = None
