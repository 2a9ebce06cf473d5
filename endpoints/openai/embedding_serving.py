"""Answer shapes for embeddings (OpenAI's list of `embedding` objects, also KoboldCpp's) and rerank results."""

from __future__ import annotations

from typing import Any

from common.generation.embeddings import Embeddings, Ranking, encode_vector


def embeddings_body(result: Embeddings, model: str, encoding_format: str = "float") -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def rerank_body(ranking: Ranking, model: str, documents: list[Any], *, return_documents: bool,
                request_id: str) -> dict[str, Any]:
    results = []
    for r in ranking.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if return_documents:
            doc = documents[r.index]
            item["document"] = doc if isinstance(doc, dict) else {"text": doc}
        results.append(item)
    return {
        "id": request_id,
        "object": "rerank",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": ranking.prompt_tokens, "total_tokens": ranking.prompt_tokens},
    }
