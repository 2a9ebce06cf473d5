"""llama.cpp server wire models: /infill, /tokenize, /detokenize bodies with llama.cpp's field names."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel


class InfillRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    input_prefix: str = ""
    input_suffix: str = ""
    prompt: str = Field("", description="Text the completion starts with, placed after the middle token.")
    model: ModelName | None = None
    n_predict: int = Field(-1, ge=-1, description="Most tokens to generate; -1 = until the context is full.")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, description="-1 = random.")
    stop: list[str] | str | None = None
    stream: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    model: ModelName | None = None


class DetokenizeRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[int]
    model: ModelName | None = None
