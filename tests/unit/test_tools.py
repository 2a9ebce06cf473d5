"""Tool calls: format detection, parsing (whole and streamed), and forcing grammars on the real vocabulary."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from backends.base import LoadOptions
from backends.llamacpp.native import NativeModel
from common.formats.constraints import ConstraintCompiler, TokenizerAdapter
from common.errors import BadRequestError
from common.formats.tools import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolFormat,
    collect,
    detect_format,
    parse_tool_calls,
    tool_call_grammar,
)
from tests.unit.test_constraints import MODEL, WalkVocab, accepts, build_adapter, random_walk

ID = re.compile(r"call_[0-9a-f]{24}")

CASES: list[tuple[ToolFormat, str, str, list[tuple[str, Any]]]] = [
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        ToolFormat.HERMES,
        'Let me look both up.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "Let me look both up.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "Europe/Paris"})],
    ),
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"arguments": {"q": "a \\"}\\" <tool_call>", "n": [1, {"k": null}]}, "name": "search"}\n</tool_call>',
        "",
        [("search", {"q": 'a "}" <tool_call>', "n": [1, {"k": None}]})],
    ),
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>\nDone.',
        "Done.",
        [("f", {"x": 1})],
    ),
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "f", "arguments": {}}\n<tool_call>\n{"name": "g", "arguments": {}}\nAll done.',
        "All done.",
        [("f", {}), ("g", {})],
    ),
    (ToolFormat.HERMES, "Just text, with a < sign and <tool_cal", "Just text, with a < sign and <tool_cal", []),
    (ToolFormat.HERMES, "Unicode\u00a0 space <tool_call>", "Unicode\u00a0 space<tool_call>", []),
    (ToolFormat.HERMES, "<tool_call>\nnot json</tool_call>", "<tool_call>\nnot json</tool_call>", []),
    (
        ToolFormat.LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        ToolFormat.LLAMA3,
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1.5}}',
        "",
        [("a", {}), ("b", {"x": 1.5})],
    ),
    (
        ToolFormat.LLAMA3,
        'I will call it now.<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}',
        "I will call it now.",
        [("get_time", {"tz": "UTC"})],
    ),
    (ToolFormat.LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (ToolFormat.LLAMA3, 'The JSON is {"name": "x"}', 'The JSON is {"name": "x"}', []),
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        ToolFormat.MISTRAL,
        'Sure! [TOOL_CALLS][{"name": "f", "arguments": {"x": [1, 2]}}, {"name": "g", "arguments": {"y": "]"}}]',
        "Sure!",
        [("f", {"x": [1, 2]}), ("g", {"y": "]"})],
    ),
    (ToolFormat.MISTRAL, "[TOOL_CALLS is not a marker", "[TOOL_CALLS is not a marker", []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parse_tool_calls(fmt: ToolFormat, text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    got_content, got_calls = parse_tool_calls(text, fmt)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(ID.fullmatch(c.id) for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def _stream(fmt: ToolFormat, text: str, rng: random.Random, tool_names: list[str] | None = None) -> list[Any]:
    parser = ToolCallStreamParser(fmt, tool_names)
    deltas: list[Any] = []
    i = 0
    while i < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13])
        deltas += parser.feed(text[i : i + size])
        i += size
    return deltas + parser.finish()


def _strip_ids(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_streaming_matches_whole_text(fmt: ToolFormat, text: str, content: str, calls: Any) -> None:
    expected_content, expected_calls = parse_tool_calls(text, fmt)
    for seed in range(25):
        deltas = _stream(fmt, text, random.Random(seed))
        got_content, got_calls = collect(deltas)
        assert got_content == expected_content
        assert _strip_ids(got_calls) == _strip_ids(expected_calls)
        # Per call: the first delta carries id and name, the rest only argument text.
        seen: set[int] = set()
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                if d.index not in seen:
                    assert d.id is not None and ID.fullmatch(d.id) and d.name and d.arguments_fragment == ""
                    seen.add(d.index)
                else:
                    assert d.id is None and d.name is None and d.arguments_fragment
        assert sorted(seen) == list(range(len(expected_calls)))


def test_marker_prefix_is_held_back_then_released() -> None:
    parser = ToolCallStreamParser(ToolFormat.HERMES)
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]
    assert parser.feed("box> ok") == [ContentDelta(" <toolbox> ok")]
    assert parser.finish() == []


def test_arguments_stream_incrementally() -> None:
    parser = ToolCallStreamParser(ToolFormat.HERMES)
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"city": "Pa')
    assert isinstance(first[0], ToolCallDelta) and first[0].name == "f"
    assert "".join(d.arguments_fragment for d in first) == '{"city": "Pa'
    rest = parser.feed('ris"}}\n</tool_call>') + parser.finish()
    assert "".join(d.arguments_fragment for d in rest if isinstance(d, ToolCallDelta)) == 'ris"}'


def test_unknown_function_stays_content() -> None:
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text, ToolFormat.HERMES, tool_names=["get_weather"])
    assert calls == [] and "rm_rf" in content


def test_cut_off_call_keeps_partial_arguments() -> None:
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1', ToolFormat.HERMES)
    assert content == "" and calls[0].name == "f" and calls[0].arguments == '{"x": 1'


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}", ToolFormat.HERMES),
        ("{{ '[AVAILABLE_TOOLS]' }} ... [TOOL_CALLS] ...", ToolFormat.MISTRAL),
        ("{%- if message.role == 'ipython' %}<|python_tag|>{% endif %}", ToolFormat.LLAMA3),
        ("{{ messages }}", ToolFormat.HERMES),
        (None, ToolFormat.HERMES),
    ],
)
def test_detect_format(template: str | None, fmt: ToolFormat) -> None:
    assert detect_format(template) is fmt


TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a {city}; syntax ::= irrelevant",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"$ref": "#/$defs/unit"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
                "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"type": "string", "maxLength": 10}, "utc": {"type": "boolean"}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]


def test_grammar_none_for_auto_and_none() -> None:
    assert tool_call_grammar(TOOLS, "auto", True, ToolFormat.HERMES) is None
    assert tool_call_grammar(TOOLS, "none", True, ToolFormat.HERMES) is None
    assert tool_call_grammar(TOOLS, None, True, ToolFormat.HERMES) is None


@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        (TOOLS, {"type": "function", "function": {"name": "missing"}}),
        ([], "required"),
        (TOOLS, "sometimes"),
        ([{"type": "function", "function": {"description": "no name"}}], "required"),
    ],
)
def test_grammar_rejects_bad_requests(tools: list[dict[str, Any]], choice: Any) -> None:
    with pytest.raises(BadRequestError):
        tool_call_grammar(tools, choice, False, ToolFormat.HERMES)


@pytest.fixture(scope="module")
def smollm() -> Iterator[tuple[TokenizerAdapter, WalkVocab]]:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL.name} is not in models/")
    model = NativeModel(MODEL, LoadOptions(max_seq_len=512, max_batch_size=1))
    try:
        adapter = build_adapter(model)
        yield adapter, WalkVocab(adapter, [model.piece(i, special=True) for i in range(model.n_vocab)])
    finally:
        model.free()


def _schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for tool in TOOLS:
        fn = tool["function"]
        out[fn["name"]] = fn.get("parameters", {"type": "object", "properties": {}})
    return out


@pytest.mark.parametrize("fmt", list(ToolFormat))
@pytest.mark.parametrize(
    ("choice", "parallel"),
    [("required", False), ("required", True), ({"type": "function", "function": {"name": "get_weather"}}, True)],
)
def test_forced_tool_calls_parse_and_validate(smollm, fmt: ToolFormat, choice: Any, parallel: bool) -> None:
    adapter, vocab = smollm
    spec = tool_call_grammar(TOOLS, choice, parallel, fmt)
    assert spec is not None
    spec.validate()
    constraint = ConstraintCompiler(adapter).compile(spec)
    schemas = _schemas()
    names = list(schemas)
    counts = []
    for seed in range(6):
        text = random_walk(constraint.new_state(), vocab, seed=seed, budget=150)
        content, calls = parse_tool_calls(text, fmt, tool_names=names)
        assert content == "", text
        assert calls, text
        if not parallel:
            assert len(calls) == 1
        if isinstance(choice, dict):
            assert {c.name for c in calls} == {"get_weather"}
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        stream_content, stream_calls = collect(_stream(fmt, text, random.Random(seed), names))
        assert (stream_content, _strip_ids(stream_calls)) == (content, _strip_ids(calls))
        counts.append(len(calls))
    if parallel:
        assert max(counts) >= 1


OPEN_CITY_TOOL = {
    "type": "function",
    "function": {"name": "get_weather",  # pydantic's shape: no additionalProperties
                 "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}},
}
CALL_TEXT = {
    ToolFormat.HERMES: '<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>',
    ToolFormat.LLAMA3: '{{"name": "get_weather", "parameters": {args}}}',
    ToolFormat.MISTRAL: '[TOOL_CALLS] [{{"name": "get_weather", "arguments": {args}}}]',
}


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_forced_arguments_hold_only_named_keys_with_bounded_whitespace(smollm, fmt: ToolFormat) -> None:
    adapter, vocab = smollm
    named = {"type": "function", "function": {"name": "get_weather"}}
    spec = tool_call_grammar([OPEN_CITY_TOOL], named, True, fmt)
    assert spec is not None
    constraint = ConstraintCompiler(adapter).compile(spec)

    def call(args: str) -> str:
        return CALL_TEXT[fmt].format(args=args)

    assert accepts(adapter, constraint, call('{"city": "Paris"}'))
    assert not accepts(adapter, constraint, call('{"city": "Paris", "properties": {"type": "x"}}'))
    for ok in ("\n" + " " * 20, "\n\t", " "):
        assert accepts(adapter, constraint, call('{"city":' + ok + '"Paris"}')), repr(ok)
    for too_much in ("\n" + " " * 21, "  ", "\n\n"):
        assert not accepts(adapter, constraint, call('{"city":' + too_much + '"Paris"}')), repr(too_much)
        assert not accepts(adapter, constraint, call('{"city": "Paris"' + too_much + "}")), repr(too_much)
    for seed in range(4):
        _, calls = parse_tool_calls(random_walk(constraint.new_state(), vocab, seed=seed, budget=80), fmt)
        assert len(calls) == 1  # a named function is called once, even with parallel calls allowed
        assert set(json.loads(calls[0].arguments)) == {"city"}


def test_named_choice_allows_one_call_required_allows_more(smollm) -> None:
    adapter, _ = smollm
    two = CALL_TEXT[ToolFormat.HERMES].format(args='{"city": "Paris"}') + "\n"
    two += CALL_TEXT[ToolFormat.HERMES].format(args='{"city": "Rome"}')
    compiler = ConstraintCompiler(adapter)
    named = tool_call_grammar([OPEN_CITY_TOOL], {"type": "function", "function": {"name": "get_weather"}}, True,
                              ToolFormat.HERMES)
    required = tool_call_grammar([OPEN_CITY_TOOL], "required", True, ToolFormat.HERMES)
    assert named is not None and required is not None
    assert not accepts(adapter, compiler.compile(named), two)
    assert accepts(adapter, compiler.compile(required), two)


@pytest.mark.parametrize(
    ("text", "arguments"),
    [
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1', '{"x": 1'),
        ('<tool_call>\n{"name": "f", "argu', ""),  # cut before the arguments: nothing made up
        ('<tool_call>\n{"name": "f"', ""),
        ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1', '{"x": 1'),  # JSON-encoded string, decoded so far
        ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\', '{"x'),
        ('<tool_call>\n{"name": "f"}\n</tool_call>', "{}"),  # a whole call without arguments
    ],
)
def test_cut_call_keeps_exactly_what_was_written(text: str, arguments: str) -> None:
    content, calls = parse_tool_calls(text, ToolFormat.HERMES)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", arguments)]
    for seed in range(3):  # streamed in random pieces: the same
        stream_content, stream_calls = collect(_stream(ToolFormat.HERMES, text, random.Random(seed), None))
        assert (stream_content, [(c.name, c.arguments) for c in stream_calls]) == (content, [("f", arguments)])
