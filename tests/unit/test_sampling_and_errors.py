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
    from endpoints.http.deps import dialect_at
    from endpoints.kobold.router import router as kobold_router
    from endpoints.llamacpp.router import router as llamacpp_router
    from endpoints.ollama.router import router as ollama_router
    from endpoints.openai.router import router as openai_router

    app = FastAPI()
    for router in (core_router, openai_router, llamacpp_router, ollama_router, kobold_router):
        app.include_router(router)
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
