"""Embedding routes in OpenAI's error shape: /v1/embeddings, and rerank at /v1/rerank and /v2/rerank."""

from __future__ import annotations

import uuid

from fastapi import Depends, Request
from starlette.responses import JSONResponse

from common.errors import Dialect
from common.generation import embeddings
from common.generation.hooks import EmbeddingHooks
from endpoints.http.deps import RouteDialect, lease_embedding_model, log_unknown_fields
from endpoints.http.request_context import request_hooks
from endpoints.http.route import api_router
from endpoints.openai.embedding_protocol import EmbeddingRequest, RerankRequest
from endpoints.openai.embedding_serving import embeddings_body, rerank_body

router = api_router(RouteDialect(Dialect.OPENAI), tags=["Embeddings"])


@router.post("/v1/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, request: Request, hooks: EmbeddingHooks = Depends(request_hooks)
) -> JSONResponse:
    log_unknown_fields(body, "/v1/embeddings")
    with await lease_embedding_model(request, body.model) as lease:
        result = await embeddings.embed(
            lease.model, body.input, hooks=hooks, truncate=body.truncate, dimensions=body.dimensions
        )
        return JSONResponse(embeddings_body(result, lease.model.name, body.encoding_format))


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, request: Request, hooks: EmbeddingHooks = Depends(request_hooks)) -> dict:
    log_unknown_fields(body, request.url.path)
    with await lease_embedding_model(request, body.model, task="rerank") as lease:
        ranking = await embeddings.rerank(lease.model, body.query, body.documents, hooks=hooks, top_n=body.top_n)
        return rerank_body(ranking, lease.model.name, body.documents, return_documents=body.return_documents,
                           request_id=f"rerank-{uuid.uuid4().hex[:16]}")
