"""Downloads from the Hugging Face Hub into the model directory (admin key).

The request is validated and the hub asked what to fetch before any response starts, so a bad
field, a missing or gated repo or an unreachable hub is a plain 4xx/5xx. The download itself is a
job of the server's DownloadManager: a client that leaves only stops watching, the download
finishes in the background (GET /v1/downloads), and the same request again joins it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from loguru import logger
from starlette.responses import JSONResponse, Response

from endpoints.http.auth import require_admin
from common.downloads.jobs import DownloadJob, DownloadManager
from common.downloads.request import DownloadRequest
from common.errors import ClientClosedError, Dialect
from endpoints.http.streaming import dumps, sse_response, until_disconnect
from endpoints.core.protocol import DownloadBody
from endpoints.http.deps import get_downloads, log_unknown_fields
from endpoints.http.error_docs import error_responses
from endpoints.http.json_body import StrictJSONRoute

router = APIRouter(tags=["Core"], route_class=StrictJSONRoute, responses=error_responses(Dialect.OPENAI))


@router.post("/v1/download", dependencies=[Depends(require_admin)])
async def download(
    body: DownloadBody, request: Request, downloads: DownloadManager = Depends(get_downloads)
) -> Response:
    """SSE frames `download.progress` {bytes_done, bytes_total, file, ...}, then `download.finished`
    {download_path, model_name, files}; with "stream": false, the finished object alone."""
    log_unknown_fields(body, "/v1/download")
    req = DownloadRequest(
        repo_id=body.repo_id, revision=body.revision, include=body.include, exclude=body.exclude,
        folder_name=body.folder_name, token=body.token, repo_type=body.repo_type,
    )
    plan = await downloads.plan(req)
    job, _joined = downloads.start(plan)
    if not body.stream:
        try:
            result = await until_disconnect(request, job.result())
        except ClientClosedError:
            logger.info("The client left; the download of {} continues in the background", req.repo_id)
            raise
        return JSONResponse(result.as_dict())
    return sse_response(_frames(job), Dialect.OPENAI, done_marker=False)


async def _frames(job: DownloadJob) -> AsyncIterator[str]:
    try:
        async for progress in job.updates():
            yield f"data: {dumps(progress.as_dict())}\n\n"
    except BaseException:
        if not job.done:
            logger.info("The client left; the download of {} continues in the background", job.plan.request.repo_id)
        raise
    result = await job.result()  # a failure becomes the stream's error frame
    yield f"data: {dumps(result.as_dict())}\n\n"


@router.get("/v1/downloads", dependencies=[Depends(require_admin)])
async def list_downloads(downloads: DownloadManager = Depends(get_downloads)) -> dict[str, Any]:
    """Downloads running now (including those whose client left)."""
    return {"object": "list", "data": [job.describe() for job in downloads.active()]}
