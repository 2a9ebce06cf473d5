"""llama.cpp's native embedding routes, in llama-server's shapes and error envelope: /embedding (and
/embeddings) answer `[{"index", "embedding": [[...]]}]`, one pooled vector per input; /rerank ranks documents."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Depends, Request
from pydantic import AliasChoices, ConfigDict, Field
from starlette.responses import JSONResponse

from common.errors import BadRequestError, Dialect
from common.generation import embeddings
from common.generation.hooks import EmbeddingHooks
from endpoints.http.deps import RouteDialect, lease_embedding_model, log_unknown_fields
from endpoints.http.names import ModelName
from endpoints.http.request_context import request_hooks
from endpoints.http.route import api_router
from endpoints.http.wire import WireModel
from endpoints.openai.embedding_protocol import RerankRequest
from endpoints.openai.embedding_serving import rerank_body

router = api_router(RouteDialect(Dialect.LLAMACPP), tags=["llama.cpp"])


class EmbeddingContentRequest(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: ModelName | None = None
    content: Any = Field(None, validation_alias=AliasChoices("content", "input"))
    embd_normalize: int = 2
    truncate: bool = False


@router.post("/embedding")
@router.post("/embeddings")
async def embedding(
    body: EmbeddingContentRequest, request: Request, hooks: EmbeddingHooks = Depends(request_hooks)
) -> JSONResponse:
    log_unknown_fields(body, request.url.path)
    if body.embd_normalize != 2:
        raise BadRequestError(
            f"embd_normalize {body.embd_normalize} is not supported: vectors come normalised to unit length "
            "(embd_normalize 2). Leave it out or send 2.", param="embd_normalize",
        )
    with await lease_embedding_model(request, body.model) as lease:
        result = await embeddings.embed(lease.model, body.content, hooks=hooks, field="content", truncate=body.truncate)
    return JSONResponse([{"index": i, "embedding": [v]} for i, v in enumerate(result.vectors.tolist())])


@router.post("/rerank")
async def rerank(
    body: RerankRequest, request: Request, hooks: EmbeddingHooks = Depends(request_hooks)
) -> dict[str, Any]:
    log_unknown_fields(body, "/rerank")
    with await lease_embedding_model(request, body.model, task="rerank") as lease:
        ranking = await embeddings.rerank(lease.model, body.query, body.documents, hooks=hooks, top_n=body.top_n)
        return rerank_body(ranking, lease.model.name, body.documents, return_documents=body.return_documents,
                           request_id=f"rerank-{uuid.uuid4().hex[:16]}")
