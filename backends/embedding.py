"""The contract of embedding engines: text in, one vector (or one relevance score) per input out.

An `EmbeddingEngine` is an `Engine` so that the model manager lists, loads,
evicts and unloads it like any model; it cannot generate text (`submit`
refuses with a 400 naming `model`). Inputs arrive tokenized by the engine's
own tokenizer (`EmbedInput`), already checked and cut to `max_input_tokens`
by the caller; vectors come back L2-normalised, as OpenAI, Ollama and
llama-server return them.

`task` says what the model computes: `embed` (a vector per input) or `rerank`
(a cross-encoder: a relevance score per query-document pair).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from backends.base import Engine, GenerationHandle, GenerationRequest
from common.errors import BadRequestError

EmbeddingTask = Literal["embed", "rerank"]
POOLING_NAMES = ("mean", "cls", "last", "rank")


@dataclass(frozen=True)
class EmbedInput:
    """One input: its tokens (with the model's special tokens) and, when it came as text, the text."""

    tokens: tuple[int, ...]
    text: str | None = None


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (n_inputs, dimensions) float32, each row of unit length
    prompt_tokens: int


@dataclass(frozen=True)
class RerankResult:
    scores: tuple[float, ...]  # one per document, in the documents' order, from 0 to 1
    prompt_tokens: int


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32, copy=False)


class EmbeddingEngine(Engine):
    """One embedding or reranking model; many concurrent requests share its batches."""

    is_embedding: ClassVar[bool] = True
    task: EmbeddingTask = "embed"
    dimensions: int = 0  # vector length (0 for a reranker)
    max_input_tokens: int = 512  # longest input, special tokens included
    pooling: str = "mean"

    @abc.abstractmethod
    async def embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        """One normalised vector per input, in order."""

    async def rerank(self, query: EmbedInput, documents: list[EmbedInput]) -> RerankResult:
        """Cross-encoder scores for (query, document) pairs; only engines whose task is `rerank`."""
        raise BadRequestError(
            f"'{self.info.name}' is not a cross-encoder; rerank with it by cosine similarity instead.", param="model"
        )

    def token_piece(self, token: int) -> bytes:
        return self.detokenize([token], special=True).encode("utf-8")

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        raise BadRequestError(
            f"'{self.info.name}' is an embedding model: it cannot generate text. Name a chat model in `model`, "
            "or send this text to /v1/embeddings.",
            param="model",
        )
