"""Embeddings and rerank for every dialect: check the inputs, tokenize, fit, run, shape the numbers.

Routes differ in field names and answer shapes only. Each passes what the
client sent (`input`, `prompt`, `content`, `documents`, ...) untouched, with
the field's name, and gets back vectors or ranked scores; every client
mistake is a 400 naming the field (and the item: `input[2]`). Inputs are
tokenized by the model's own tokenizer with its special tokens (CLS/SEP for
BERT); token-id inputs are used as sent. An input longer than the model reads
is cut when `truncate` is true, else refused.

The caller's `EmbeddingHooks` admit the request once its inputs are checked
(rate limits, draining) and count it with the tokens read (metrics, the
token budget), as `start_generation` does for generations.

Rerank with a cross-encoder (task `rerank`) scores each (query, document)
pair with it; with an embedding model it ranks documents by the cosine
similarity of their vectors to the query's.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.embedding import EmbeddingEngine, EmbedInput, normalize_rows
from common.errors import BadRequestError, ContextLengthExceededError
from common.generation.hooks import EmbeddingHooks
from common.models.loaded import LoadedModel

MAX_INPUTS = 4096  # inputs (or documents) in one request
INLINE_TOKENIZE_CHARS = 20_000  # more text than this is tokenized off the event loop


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dimensions) float32, unit rows
    prompt_tokens: int


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float


@dataclass(frozen=True)
class Ranking:
    results: tuple[Ranked, ...]  # best first
    prompt_tokens: int
    by_cosine: bool  # True when an embedding model ranked by cosine similarity


def engine_of(model: LoadedModel) -> EmbeddingEngine:
    engine = model.engine
    if not isinstance(engine, EmbeddingEngine):
        raise BadRequestError(f"'{model.name}' is a text generation model; it gives no embeddings. Name an "
                              "embedding model, or load one with POST /v1/model/embedding/load.", param="model")
    return engine


def _empty(field: str) -> BadRequestError:
    return BadRequestError(f"`{field}` is empty: send a non-empty string or a list of them.", param=field)


def parse_inputs(raw: Any, field: str) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids or a list of lists of ids -> one item per input."""
    if isinstance(raw, str):
        if not raw:
            raise _empty(field)
        return [raw]
    if not isinstance(raw, list):
        raise BadRequestError(f"`{field}` must be a string or a list of strings (or token ids); got "
                              f"{type(raw).__name__ if raw is not None else 'nothing'}.", param=field)
    if not raw:
        raise _empty(field)
    if len(raw) > MAX_INPUTS:
        raise BadRequestError(f"`{field}` has {len(raw)} items; send at most {MAX_INPUTS} per request.", param=field)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [list(raw)]  # one input given as token ids
    items: list[str | list[int]] = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            if not item:
                raise BadRequestError(f"`{where}` is an empty string: every input needs some text.", param=where)
            items.append(item)
        elif isinstance(item, list) and item and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            items.append(list(item))
        else:
            raise BadRequestError(f"`{where}` must be a string (or a non-empty list of token ids); got "
                                  f"{type(item).__name__}. Send every input as text.", param=where)
    return items


def tokenize_inputs(
    engine: EmbeddingEngine, items: Sequence[str | list[int]], field: str, *, truncate: bool, single: bool = False
) -> list[EmbedInput]:
    """Tokens for each input, checked against the vocabulary and cut (or refused) at the model's length."""
    limit = engine.max_input_tokens
    n_vocab = engine.info.n_vocab
    out: list[EmbedInput] = []
    for i, item in enumerate(items):
        where = field if single else f"{field}[{i}]"
        if isinstance(item, str):
            tokens = engine.tokenize(item, add_bos=True, special=True)
            text: str | None = item
        else:
            bad = next((t for t in item if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise BadRequestError(f"`{where}` holds token id {bad}, outside this model's vocabulary "
                                      f"(0..{n_vocab - 1}). Send ids from its tokenizer, or text.", param=where)
            tokens, text = list(item), None
        if len(tokens) > limit:
            if not truncate:
                raise ContextLengthExceededError(
                    f"`{where}` is {len(tokens)} tokens; '{engine.info.name}' reads at most {limit}. Shorten it, or "
                    "send truncate: true to cut it.", param=where)
            tokens = tokens[: limit - 1] + tokens[-1:] if text is not None else tokens[:limit]
            text = None  # the engine embeds the tokens kept
        out.append(EmbedInput(tuple(tokens), text))
    return out


async def embed(
    model: LoadedModel, raw: Any, *, hooks: EmbeddingHooks, field: str = "input", truncate: bool = False,
    dimensions: int | None = None,
) -> Embeddings:
    """Unit vectors for what the client sent in `field`; `dimensions` keeps the first that many, re-normalised.
    `hooks` admit the request once the inputs are checked and count it once embedded."""
    engine = engine_of(model)
    if dimensions is not None:
        check_dimensions(engine, dimensions)
    items = parse_inputs(raw, field)
    if sum(len(i) for i in items) > INLINE_TOKENIZE_CHARS:
        inputs = await asyncio.to_thread(tokenize_inputs, engine, items, field, truncate=truncate)
    else:
        inputs = tokenize_inputs(engine, items, field, truncate=truncate)
    await hooks.admit(1)
    result = await engine.embed(inputs)
    hooks.embedded(model.name, result.prompt_tokens)
    vectors = result.vectors
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = normalize_rows(vectors[:, :dimensions])
    return Embeddings(vectors, result.prompt_tokens)


def check_dimensions(engine: EmbeddingEngine, dimensions: int) -> None:
    if engine.task == "rerank":
        raise BadRequestError(f"'{engine.info.name}' is a cross-encoder: it gives scores, not vectors. Send the "
                              "pairs to /v1/rerank.", param="model")
    if isinstance(dimensions, bool) or not 1 <= dimensions <= engine.dimensions:
        raise BadRequestError(f"`dimensions` is {dimensions}; '{engine.info.name}' gives vectors of "
                              f"{engine.dimensions}. Ask for 1..{engine.dimensions}, or leave it out.",
                              param="dimensions")


def _documents(raw: Any) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("`documents` must be a non-empty list of strings.", param="documents")
    if len(raw) > MAX_INPUTS:
        raise BadRequestError(f"`documents` has {len(raw)} items; send at most {MAX_INPUTS}.", param="documents")
    texts = []
    for i, doc in enumerate(raw):
        text = doc.get("text") if isinstance(doc, dict) else doc  # Cohere also sends {"text": ...}
        if not isinstance(text, str) or not text:
            raise BadRequestError(f"`documents[{i}]` must be a non-empty string (or {{\"text\": \"...\"}}).",
                                  param=f"documents[{i}]")
        texts.append(text)
    return texts


async def rerank(
    model: LoadedModel, query: Any, documents: Any, *, hooks: EmbeddingHooks, top_n: int | None = None
) -> Ranking:
    """Documents ranked by relevance to the query, best first (at most `top_n`); `hooks` as for `embed`."""
    engine = engine_of(model)
    if not isinstance(query, str) or not query:
        raise BadRequestError("`query` must be a non-empty string.", param="query")
    texts = _documents(documents)
    if top_n is not None and (isinstance(top_n, bool) or top_n < 1):
        raise BadRequestError(f"`top_n` is {top_n}; ask for at least 1 result, or leave it out.", param="top_n")
    q = tokenize_inputs(engine, [query], "query", truncate=True, single=True)[0]
    if sum(len(t) for t in texts) > INLINE_TOKENIZE_CHARS:
        docs = await asyncio.to_thread(tokenize_inputs, engine, texts, "documents", truncate=True)
    else:
        docs = tokenize_inputs(engine, texts, "documents", truncate=True)
    await hooks.admit(1)
    if engine.task == "rerank":
        scored = await engine.rerank(q, docs)
        scores, tokens, by_cosine = np.asarray(scored.scores, dtype=np.float64), scored.prompt_tokens, False
    else:
        result = await engine.embed([q, *docs])
        scores = result.vectors[1:].astype(np.float64) @ result.vectors[0].astype(np.float64)
        tokens, by_cosine = result.prompt_tokens, True
    hooks.embedded(model.name, tokens)
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    return Ranking(tuple(Ranked(i, float(scores[i])) for i in order), tokens, by_cosine)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """OpenAI's `encoding_format`: floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()
