"""Strict JSON bodies and request model names (endpoints/http/json_body.py, endpoints/http/names.py)."""

from __future__ import annotations

import json

import pytest

from common.errors import BadRequestError
from endpoints.http.json_body import MAX_DEPTH, parse_json_body
from endpoints.http.names import check_model_name


def rejected(raw: bytes) -> BadRequestError:
    with pytest.raises(BadRequestError) as exc:
        parse_json_body(raw)
    assert exc.value.status == 400
    return exc.value


def test_valid_json_passes_unchanged() -> None:
    body = {"messages": [{"role": "user", "content": "héllo 🙂"}], "max_tokens": 2**63, "t": 0.5, "x": None}
    assert parse_json_body(json.dumps(body).encode()) == body
    assert parse_json_body(json.dumps(body, ensure_ascii=True).encode()) == body  # escaped pairs are text
    assert parse_json_body(b"\xef\xbb\xbf{}") == {}  # a UTF-8 byte order mark is tolerated


@pytest.mark.parametrize(("raw", "param", "words"), [
    (b'{"a": NaN}', "a", "NaN"),
    (b'{"a": [1, {"b": -Infinity}]}', "a[1].b", "-Infinity"),
    (b'{"m": [{"c": "x\\ud800"}]}', "m[0].c", "surrogate \\ud800"),
    (b'{"o": {"\\udc00": 1}}', "o", "key"),
    (b'{"n": 18446744073709551616}', "n", "2**64"),
    (b'{"n": -18446744073709551616}', "n", "2**64"),
])
def test_bad_values_name_their_field(raw: bytes, param: str, words: str) -> None:
    err = rejected(raw)
    assert err.param == param and words in err.message and param in err.message


def test_malformed_bodies_say_what_to_send() -> None:
    assert "not valid JSON" in rejected(b'{"a": ').message and "line 1 column" in rejected(b'{"a": ').message
    assert "UTF-8" in rejected(b'{"a": "\xff"}').message
    assert "digits" in rejected(b'{"a": ' + b"9" * 5000 + b"}").message
    assert "nests deeper" in rejected(b"[" * 100_000 + b"]" * 100_000).message


def test_depth_limit_is_exact() -> None:
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json_body(ok.encode()) is not None
    err = rejected(("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)).encode())
    assert "nests deeper" in err.message


@pytest.mark.parametrize("name", ["gpt-4o", "org/model", "hf.co/owner/repo:Q4_K_M", "SmolLM2-135M.Q4_1.gguf",
                                  "a.b", "name:latest", ""])
def test_model_names_clients_send_are_accepted(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..\\x", "a/../../b", "%2e%2e/x", "a\x00b", "~/m",
                                  "a\nb", "x" * 300])
def test_path_like_model_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a model name"):
        check_model_name(name)
