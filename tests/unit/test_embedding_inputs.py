"""The embeddings pipeline's own logic (common/generation/embeddings.py) over a tiny scripted engine."""

from __future__ import annotations

import base64
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from backends.base import EngineStats, ModelInfo
from backends.embedding import EmbeddingEngine, EmbedInput, EmbedResult, RerankResult, normalize_rows
from common.errors import BadRequestError, ContextLengthExceededError
from common.generation import embeddings
from common.generation.hooks import NO_HOOKS

CLS, SEP = 1, 2


class WordEngine(EmbeddingEngine):
    """One token per word (id = 3 + word length), CLS/SEP around; a word-length histogram as the vector."""

    def __init__(self, task: str = "embed") -> None:
        self.task = task
        self.dimensions = 8
        self.max_input_tokens = 6
        self.info = ModelInfo(name="words", path="", backend="test", n_ctx=6, n_ctx_train=6, n_vocab=20,
                              bos_token="", eos_token="", bos_token_id=CLS, eos_token_id=SEP, add_bos_token=True,
                              chat_template=None)
        self.seen: list[list[EmbedInput]] = []

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        ids = [3 + min(len(w), 16) for w in text.split()]
        return [CLS, *ids, SEP] if add_bos else ids

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return " ".join("x" * (t - 3) for t in tokens if t > SEP)

    async def embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        self.seen.append(inputs)
        rows = np.zeros((len(inputs), self.dimensions), dtype=np.float32)
        for r, item in enumerate(inputs):
            for t in item.tokens:
                rows[r, t % self.dimensions] += 1
        return EmbedResult(normalize_rows(rows), sum(len(i.tokens) for i in inputs))

    async def rerank(self, query: EmbedInput, documents: list[EmbedInput]) -> RerankResult:
        return RerankResult(tuple(len(d.tokens) / 10 for d in documents), 0)

    def stats(self) -> EngineStats:
        return EngineStats(1, 0, 0, 0, 0)

    async def close(self) -> None:
        return None


def model(engine: Any) -> Any:
    return SimpleNamespace(name=engine.info.name, engine=engine)


@pytest.mark.parametrize(("raw", "param"), [
    ("", "input"), ([], "input"), (None, "input"), (5, "input"), ({"text": "x"}, "input"),
    (["a", ""], "input[1]"), (["a", 3], "input[1]"), (["a", True], "input[1]"), ([[1, 2], []], "input[1]"),
    ([["a"]], "input[0]"), ([[1, 2.5]], "input[0]"),
])
def test_bad_inputs_name_the_item(raw: Any, param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        embeddings.parse_inputs(raw, "input")
    assert info.value.param == param and info.value.status == 400


def test_input_forms() -> None:
    assert embeddings.parse_inputs("hi", "input") == ["hi"]
    assert embeddings.parse_inputs(["a", "b"], "input") == ["a", "b"]
    assert embeddings.parse_inputs([5, 6], "input") == [[5, 6]]  # one input as token ids
    assert embeddings.parse_inputs([[5], [6, 7]], "input") == [[5], [6, 7]]
    assert embeddings.parse_inputs(["a", [5]], "input") == ["a", [5]]
    with pytest.raises(BadRequestError):
        embeddings.parse_inputs(["a"] * (embeddings.MAX_INPUTS + 1), "input")


def test_vocabulary_and_length() -> None:
    engine = WordEngine()
    with pytest.raises(BadRequestError) as info:
        embeddings.tokenize_inputs(engine, [[4, 20]], "input", truncate=True)
    assert info.value.param == "input[0]" and "20" in info.value.message
    long = "a bb ccc dddd eeeee ffffff"  # 6 words + CLS + SEP = 8 tokens > 6
    with pytest.raises(ContextLengthExceededError) as info:
        embeddings.tokenize_inputs(engine, ["ok", long], "prompt", truncate=False)
    assert info.value.param == "prompt[1]"
    cut = embeddings.tokenize_inputs(engine, [long, [4] * 9], "input", truncate=True)
    assert cut[0].tokens == (CLS, 4, 5, 6, 7, SEP) and cut[0].text is None  # the end token stays
    assert cut[1].tokens == (4,) * 6
    kept = embeddings.tokenize_inputs(engine, ["a b"], "input", truncate=False)[0]
    assert kept == EmbedInput((CLS, 4, 4, SEP), "a b")


async def test_dimensions_truncate_and_renormalise() -> None:
    engine = WordEngine()
    full = await embeddings.embed(model(engine), ["a bb ccc"], hooks=NO_HOOKS)
    short = await embeddings.embed(model(engine), ["a bb ccc"], hooks=NO_HOOKS, dimensions=3)
    assert short.vectors.shape == (1, 3) and abs(np.linalg.norm(short.vectors[0]) - 1) < 1e-6
    assert np.allclose(short.vectors[0], full.vectors[0][:3] / np.linalg.norm(full.vectors[0][:3]))
    assert full.prompt_tokens == 5
    for bad in (0, 9, -1):
        with pytest.raises(BadRequestError) as info:
            await embeddings.embed(model(engine), "x", hooks=NO_HOOKS, dimensions=bad)
        assert info.value.param == "dimensions"


async def test_rerank_by_cosine_and_by_cross_encoder() -> None:
    docs = ["zzzzzz", "a bb", {"text": "a bb ccc"}]
    ranked = await embeddings.rerank(model(WordEngine()), "a bb ccc", docs, hooks=NO_HOOKS)
    assert ranked.by_cosine and [r.index for r in ranked.results] == [2, 1, 0]
    assert ranked.results[0].score == pytest.approx(1.0)
    top = await embeddings.rerank(model(WordEngine("rerank")), "q", docs, hooks=NO_HOOKS, top_n=1)
    assert not top.by_cosine and [r.index for r in top.results] == [2]
    for query, documents, top_n, param in (("", ["a"], None, "query"), ("q", "a", None, "documents"),
                                           ("q", ["a", 1], None, "documents[1]"), ("q", ["a"], 0, "top_n")):
        with pytest.raises(BadRequestError) as info:
            await embeddings.rerank(model(WordEngine()), query, documents, hooks=NO_HOOKS, top_n=top_n)
        assert info.value.param == param


async def test_a_chat_engine_gives_no_embeddings() -> None:
    chat = SimpleNamespace(name="chat", engine=object())
    with pytest.raises(BadRequestError) as info:
        await embeddings.embed(chat, "x", hooks=NO_HOOKS)
    assert info.value.param == "model"
    with pytest.raises(BadRequestError) as info:
        WordEngine().submit(None)  # type: ignore[arg-type]
    assert info.value.param == "model"


def test_base64_is_little_endian_float32() -> None:
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    packed = embeddings.encode_vector(v, "base64")
    assert isinstance(packed, str) and np.array_equal(np.frombuffer(base64.b64decode(packed), "<f4"), v)
    assert embeddings.encode_vector(v, "float") == [0.5, -1.25, 3.0]
