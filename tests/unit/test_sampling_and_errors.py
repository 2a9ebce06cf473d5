"""SamplingParams bounds and per-dialect error shapes."""

import pytest

from common.errors import BadRequestError, ContextLengthExceededError, Dialect, ServiceUnavailableError
from backends.sampling import SamplingParams


def test_defaults_are_neutral() -> None:
    assert SamplingParams().active_knobs() == set()
    assert SamplingParams(top_k=40, min_p=0.1).active_knobs() == {"top_k", "min_p"}


@pytest.mark.parametrize("field,value", [("top_p", 1.5), ("temperature", -0.1), ("min_p", -1), ("max_tokens", 0), ("logprobs", 21)])
def test_out_of_bounds_names_the_field(field: str, value: float) -> None:
    with pytest.raises(BadRequestError) as exc:
        SamplingParams(**{field: value})
    assert exc.value.param == field and field in exc.value.message


def test_greedy_detection() -> None:
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_error_shapes_per_dialect() -> None:
    err = ContextLengthExceededError("too long", param="messages")
    assert err.body(Dialect.OPENAI) == {"error": {"message": "too long", "type": "invalid_request_error",
                                                  "param": "messages", "code": "context_length_exceeded"}}
    assert err.body(Dialect.OLLAMA) == {"error": "too long"}
    assert err.body(Dialect.KOBOLD)["detail"]["msg"] == "too long"
    assert err.body(Dialect.LLAMACPP) == {"error": {"code": 400, "message": "too long", "param": "messages",
                                                    "type": "exceed_context_size_error"}}
    busy = ServiceUnavailableError("busy", retry_after=2.4)
    assert busy.status == 503 and busy.headers["Retry-After"] == "2"


def test_dialect_by_route() -> None:
    """Each router declares its dialect; unknown paths take the router claiming their prefix, else OpenAI's."""
    from fastapi import FastAPI

    from endpoints.core.router import router as core_router
    from endpoints.http.deps import dialect_at, include_routers
    from endpoints.kobold.router import router as kobold_router
    from endpoints.llamacpp.router import router as llamacpp_router
    from endpoints.ollama.router import routers as ollama_routers
    from endpoints.openai.router import router as openai_router

    app = FastAPI()
    include_routers(app, core_router, openai_router, llamacpp_router, *ollama_routers, kobold_router)
    expected = {
        ("POST", "/v1/chat/completions"): Dialect.OPENAI,
        ("POST", "/infill"): Dialect.LLAMACPP,
        ("POST", "/completion"): Dialect.LLAMACPP,
        ("POST", "/completions"): Dialect.LLAMACPP,
        ("POST", "/v1/completions"): Dialect.OPENAI,
        ("GET", "/slots"): Dialect.LLAMACPP,
        ("POST", "/v1/model/load"): Dialect.OPENAI,
        ("POST", "/api/v1/generate"): Dialect.KOBOLD,
        ("POST", "/api/extra/generate/stream"): Dialect.KOBOLD,
        ("GET", "/api/v1/generate"): Dialect.KOBOLD,  # a 405 still answers in the route's dialect
        ("POST", "/api/chat"): Dialect.OLLAMA,
        ("POST", "/api/extra/nothing"): Dialect.KOBOLD,
        ("POST", "/api/nothing"): Dialect.OLLAMA,
        ("POST", "/v1/nothing"): Dialect.OPENAI,
        ("GET", "/"): Dialect.OPENAI,
    }
    for (method, path), dialect in expected.items():
        assert dialect_at(app, method, path).dialect is dialect, (method, path)


def test_dialects_are_recorded_as_routers_are_included() -> None:
    """The app records each route's dialect when it includes the routers (app.state.dialects), so finding a
    request's dialect never looks inside FastAPI's included-router entries (a private attribute)."""
    from pathlib import Path

    from fastapi import APIRouter, FastAPI

    from endpoints.http.deps import DialectRoutes, RouteDialect, dialect_at, include_routers
    from endpoints.http.route import api_router

    kobold = RouteDialect(Dialect.KOBOLD, claims=("/k/",))
    outer, inner = APIRouter(), api_router(kobold, prefix="/k")

    @inner.post("/go")
    async def go() -> None:
        return None

    app = FastAPI()
    include_routers(app, inner)
    assert isinstance(app.state.dialects, DialectRoutes) and len(app.state.dialects.routes) == 1
    assert dialect_at(app, "POST", "/k/go") is kobold
    assert dialect_at(app, "GET", "/k/go") is kobold  # a 405 answers in the route's dialect
    assert dialect_at(app, "POST", "/k/elsewhere") is kobold  # claimed prefix
    assert dialect_at(app, "POST", "/elsewhere").dialect is Dialect.OPENAI
    assert dialect_at(FastAPI(), "POST", "/k/go").dialect is Dialect.OPENAI  # nothing recorded: the default

    outer.include_router(inner)
    with pytest.raises(TypeError, match="include that sub-router at the app"):
        include_routers(FastAPI(), outer)  # its routes' dialects could not be recorded

    endpoints = Path(__file__).resolve().parents[2] / "endpoints"
    readers = [p.name for p in endpoints.rglob("*.py") if "original_router" in p.read_text(encoding="utf-8")]
    assert not readers, f"{readers} read FastAPI's private original_router; use app.state.dialects"
