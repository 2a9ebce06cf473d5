"""SamplingParams bounds and per-dialect error shapes."""

import pytest

from common.errors import BadRequestError, ContextLengthExceededError, Dialect, ServiceUnavailableError, dialect_for_path
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
    busy = ServiceUnavailableError("busy", retry_after=2.4)
    assert busy.status == 503 and busy.headers["Retry-After"] == "2"


def test_dialect_by_path() -> None:
    assert dialect_for_path("/v1/chat/completions") is Dialect.OPENAI
    assert dialect_for_path("/api/v1/generate") is Dialect.KOBOLD
    assert dialect_for_path("/api/extra/generate/stream") is Dialect.KOBOLD
    assert dialect_for_path("/api/chat") is Dialect.OLLAMA
