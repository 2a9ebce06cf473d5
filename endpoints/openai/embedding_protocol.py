"""Wire models for embeddings and rerank: OpenAI's /v1/embeddings, and the rerank shape llama.cpp, Infinity,
Jina and Cohere share (`{model, query, documents, top_n, return_documents}`).

`input`, `query` and `documents` are taken as sent and checked in common/generation/embeddings.py, so every
mistake is a 400 naming the field and the item."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel


class EmbeddingRequest(WireModel):
    model_config = ConfigDict(extra="allow")

    model: ModelName | None = None
    input: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = False  # Parley: cut inputs longer than the model reads instead of refusing them


class RerankRequest(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: ModelName | None = None
    query: Any = None
    documents: Any = Field(None, validation_alias=AliasChoices("documents", "texts"))  # texts: TEI's name
    top_n: int | None = Field(None, validation_alias=AliasChoices("top_n", "top_k"))
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_text"))
