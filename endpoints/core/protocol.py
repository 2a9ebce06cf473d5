"""Wire models of the admin/core API (TabbyAPI compatible)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel


class DraftModelLoad(WireModel):
    """Speculative decoding for a load: a draft model (same tokenizer) or n-gram lookup."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    draft_model_name: str | None = Field(None, min_length=1)
    draft_mode: Literal["none", "model", "ngram"] | None = None
    draft_max_tokens: int | None = Field(None, ge=1, le=64)
    draft_adaptive: bool | None = None


# Context sizes past this overflow llama.cpp's 32-bit counts long before any model needs them.
MAX_CONTEXT = 1 << 24


class ModelLoadRequest(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    model_name: str = Field(..., min_length=1, validation_alias=AliasChoices("model_name", "name", "model"))
    max_seq_len: int | None = Field(None, ge=16, le=MAX_CONTEXT)
    cache_size: int | None = Field(None, ge=16, le=MAX_CONTEXT)
    cache_mode: Literal["FP16", "Q8_0", "Q4_0"] | None = None
    chunk_size: int | None = Field(None, ge=64, le=8192)
    max_batch_size: int | None = Field(None, ge=1, le=256)
    prompt_template: str | None = None
    backend: str | None = None
    n_threads: int | None = Field(None, ge=1, le=1024)
    n_gpu_layers: int | None = Field(None, ge=-1, le=100_000)
    flash_attention: Literal["auto", "on", "off"] | None = None
    draft_model: DraftModelLoad | None = None
    mmproj: str | None = Field(
        None, max_length=255,
        description="Vision projector: a file name in the model's folder, or 'none' for no vision.",
    )


class ModelUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model_name: str | None = Field(None, validation_alias=AliasChoices("model_name", "name", "model"))


class TokenEncodeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    model: ModelName | None = None
    add_bos_token: bool = True
    encode_special_tokens: bool = True


class TokenDecodeRequest(WireModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]
    model: ModelName | None = None
    decode_special_tokens: bool = True


class TemplateSwitchRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    prompt_template_name: str = Field(..., min_length=1, validation_alias=AliasChoices("prompt_template_name", "name"))
    model: ModelName | None = None


class SamplerOverrideSwitchRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    preset: str | None = Field(None, validation_alias=AliasChoices("preset", "name"))
    overrides: dict[str, Any] | None = None


class DownloadBody(BaseModel):
    """POST /v1/download: TabbyAPI's fields, plus `stream`."""

    model_config = ConfigDict(extra="allow")
    repo_id: str = Field(..., min_length=1, max_length=200, description="Hub repository, 'owner/name'.")
    revision: str | None = Field(None, description="Branch, tag or commit. Default: the repo's main branch.")
    include: list[str] = Field(default_factory=list, max_length=100, description="Only files matching these globs.")
    exclude: list[str] = Field(default_factory=list, max_length=100, description="Skip files matching these globs.")
    folder_name: str | None = Field(None, description="Folder in the model directory. Default: the repo name.")
    token: str | None = Field(None, max_length=1000, description="Hub token for gated or private repos.")
    repo_type: Literal["model", "dataset", "space"] = "model"
    stream: bool = Field(True, description="SSE progress frames; false answers one JSON object when done.")

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _one_glob(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class LoraChoiceModel(WireModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200)
    scaling: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


class LoraLoadRequest(WireModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    loras: list[LoraChoiceModel] = Field(..., max_length=16)
    model: ModelName | None = None


class LoraUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    loras: list[str] | None = Field(None, max_length=64)
    model: ModelName | None = None

