"""GET /metrics: Prometheus text format from the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from endpoints.http.auth import AuthManager, Permission
from endpoints.http.request_context import Services

router = APIRouter(tags=["Core"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Open, or behind an API or admin key, as `network.metrics_auth` says."""
    services: Services = request.app.state.services
    needed = services.config.network.metrics_auth
    if needed != "none":
        auth: AuthManager = request.app.state.auth
        request.state.api_key = auth.require_entry(request.headers, Permission(needed))
    assert services.metrics is not None
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
