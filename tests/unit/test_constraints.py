"""Constraints over the real SmolLM2 vocabulary: random walks over the mask must always validate.

A walk samples uniformly among the allowed tokens (seeded), and after a step
budget steers toward closing tokens so that every walk terminates; whatever
it produces must satisfy the constraint.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llama_cpp as lc
import numpy as np
import pytest

from backends.base import LoadOptions
from backends.llamacpp.native import NativeModel
from common.formats.constraints import (
    ConstraintCompiler,
    ConstraintSpec,
    ConstraintState,
    ConstraintViolation,
    TokenizerAdapter,
)
from common.errors import BadRequestError

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
_CLOSERS = set('"}])')


class MaskTimer:
    """Accumulates the per-step cost of computing masks."""

    def __init__(self) -> None:
        self.mask_seconds = 0.0
        self.apply_seconds = 0.0
        self.steps = 0

    def ms(self, seconds: float) -> float:
        return 1000.0 * seconds / max(1, self.steps)


def build_adapter(model: NativeModel) -> TokenizerAdapter:
    pieces = [model.piece(i, special=True) for i in range(model.n_vocab)]
    control = {
        i for i in range(model.n_vocab) if lc.llama_token_get_attr(model.vocab, i) & lc.LLAMA_TOKEN_ATTR_CONTROL
    }

    def tokenize(data: bytes) -> list[int]:
        return model.tokenize(data.decode("utf-8", "replace"), add_bos=False, special=False)

    return TokenizerAdapter.from_pieces(
        pieces,
        list(model.eog_tokens),
        control,
        bos_token=lc.llama_vocab_bos(model.vocab),
        tokenize=tokenize,
    )


@pytest.fixture(scope="module")
def smollm() -> Iterator[tuple[TokenizerAdapter, WalkVocab]]:
    if not MODEL.is_file():
        pytest.skip(f"{MODEL.name} is not in models/")
    model = NativeModel(MODEL, LoadOptions(max_seq_len=512, max_batch_size=1))
    try:
        adapter = build_adapter(model)
        pieces = [model.piece(i, special=True) for i in range(model.n_vocab)]
        yield adapter, WalkVocab(adapter, pieces)
    finally:
        model.free()


@pytest.fixture(scope="module")
def compiler(smollm: tuple[TokenizerAdapter, WalkVocab]) -> ConstraintCompiler:
    return ConstraintCompiler(smollm[0])


@pytest.fixture(scope="module")
def timer() -> Iterator[MaskTimer]:
    t = MaskTimer()
    yield t


class WalkVocab:
    """Per-vocabulary arrays the walker needs, computed once."""

    def __init__(self, adapter: TokenizerAdapter, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.is_eos = np.zeros(adapter.n_vocab, dtype=bool)
        self.is_eos[list(adapter.eos_tokens)] = True
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int32)
        self.closing = np.array(
            [bool(p.strip()) and set(p.decode("utf-8", "replace").strip()) <= _CLOSERS for p in pieces], dtype=bool
        )


def random_walk(
    state: ConstraintState,
    vocab: WalkVocab,
    seed: int,
    *,
    budget: int = 200,
    hard_cap: int = 1500,
    timer: MaskTimer | None = None,
) -> str:
    """Uniform random tokens among the allowed ones; EOS once finished. Returns the text.

    Before `budget` steps every allowed token (EOS included) is equally likely;
    after it, EOS is taken as soon as allowed, else closing tokens (quotes,
    brackets) or the shortest allowed pieces, so that every walk terminates.
    """
    rng = np.random.default_rng(seed)
    out: list[int] = []
    logits = np.zeros(len(vocab.is_eos), dtype=np.float32)
    for step in range(hard_cap):
        if state.is_finished():
            break
        if timer is not None:
            started = time.perf_counter()
            state.bitmask()
            masked = time.perf_counter()
            state.apply_to_logits(logits)
            timer.mask_seconds += masked - started
            timer.apply_seconds += time.perf_counter() - masked
            timer.steps += 1
        allowed = state.allowed_tokens()
        assert len(allowed) > 0, f"empty mask after {b''.join(vocab.pieces[t] for t in out)!r}"
        if step >= budget:
            ends = allowed[vocab.is_eos[allowed]]
            if len(ends):
                break
            candidates = allowed[vocab.closing[allowed]]
            if not len(candidates):
                lengths = vocab.lengths[allowed]
                candidates = allowed[lengths == lengths.min()]
        else:
            candidates = allowed
        choice = int(rng.choice(candidates))
        if vocab.is_eos[choice]:
            break
        state.advance(choice)
        out.append(choice)
    else:
        raise AssertionError(f"walk did not finish in {hard_cap} steps: {b''.join(vocab.pieces[t] for t in out)!r}")
    text = b"".join(vocab.pieces[t] for t in out)
    assert state.is_accepting(), f"stopped in a non-accepting state: {text!r}"
    return text.decode("utf-8")


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": 5},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                },
                "required": ["id", "tags"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "number", "minimum": -1.5, "maximum": 2.5}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "active": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["active", "note"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "label": {"type": "string", "minLength": 2, "maxLength": 4},
            "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        },
        "required": ["kind", "label"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "pair": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pair"}, "b": {"$ref": "#/$defs/pair"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 12},
            "done": {"type": "boolean"},
            "priority": {"type": "integer", "enum": [1, 2, 3]},
            "children": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        },
        "required": ["title", "done", "priority"],
    },
]

REGEXES: list[str] = [
    r"[a-z]{3,8}",
    r"\d{3}-\d{4}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}",
    r"0x[0-9a-f]{1,8}",
    r"\d+(\.\d{1,2})?",
    r"[a-z0-9._]{1,10}@[a-z]{2,8}\.(com|org|net)",
    r"(\d{1,3}\.){3}\d{1,3}",
    r"#[0-9A-Fa-f]{6}",
    r"(ab|cd)*ef",
    r"\d{2}/\d{2}/\d{4}",
    r"[^\d\n]{1,12}",
]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_walks_validate(smollm, compiler, timer, index: int) -> None:
    adapter, vocab = smollm
    schema = SCHEMAS[index]
    spec = ConstraintSpec.from_request(json_schema=schema)
    assert spec is not None and spec.kind == "json_schema"
    constraint = compiler.compile(spec)
    for seed in range(4):
        text = random_walk(constraint.new_state(), vocab, seed=1000 * index + seed, timer=timer)
        value = json.loads(text)
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_fullmatch(smollm, compiler, timer, pattern: str) -> None:
    adapter, vocab = smollm
    constraint = compiler.compile(ConstraintSpec.from_request(regex_pattern=pattern))  # type: ignore[arg-type]
    for seed in range(4):
        text = random_walk(constraint.new_state(), vocab, seed=seed, timer=timer)
        assert re.fullmatch(pattern, text, flags=re.ASCII), (pattern, text)


def test_regex_digit_class_is_ascii(smollm, compiler) -> None:
    adapter, _ = smollm
    state = compiler.compile(ConstraintSpec("regex", r"\d+")).new_state()
    allowed = {adapter.ll_tokenizer.decode_str([int(t)]) for t in state.allowed_tokens()}
    assert allowed and all(re.fullmatch(r"[0-9]+", s) for s in allowed - {""})
    arabic_three = adapter.ll_tokenizer.tokenize_str("\u0663")
    assert not state.is_allowed(arabic_three[0])


GBNF_ANSWER = r"""
root ::= answer
answer ::= "yes" | "no" | num
num ::= [0-9]+ ("." [0-9]+)?
"""

GBNF_LIST = r"""
root   ::= "[" item ("," ws item)* "]"
item   ::= [a-z]+
ws     ::= " "?
"""

GBNF_ARITH = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= [0-9]+ | "(" expr ")"
"""

LARK_PAIRS = r"""
start: pair ("\n" pair)*
pair: KEY "=" VALUE
KEY: /[a-z]{1,6}/
VALUE: /[0-9]{1,4}/
"""

LARK_INLINE_JSON = r"""
start: "Answer: " obj
obj: %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}
"""


def _balanced_arith(text: str) -> bool:
    pos = 0

    def term() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        return pos > start

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


GRAMMARS: list[tuple[str, Any]] = [
    (GBNF_ANSWER, lambda t: re.fullmatch(r"yes|no|[0-9]+(\.[0-9]+)?", t)),
    (GBNF_LIST, lambda t: re.fullmatch(r"\[[a-z]+(, ?[a-z]+)*\]", t)),
    (GBNF_ARITH, _balanced_arith),
    (LARK_PAIRS, lambda t: re.fullmatch(r"[a-z]{1,6}=[0-9]{1,4}(\n[a-z]{1,6}=[0-9]{1,4})*", t)),
    (LARK_INLINE_JSON, lambda t: t.startswith("Answer: ") and isinstance(json.loads(t[8:])["ok"], bool)),
]


@pytest.mark.parametrize("index", range(len(GRAMMARS)))
def test_grammar_walks_parse(smollm, compiler, timer, index: int) -> None:
    adapter, vocab = smollm
    grammar, check = GRAMMARS[index]
    constraint = compiler.compile(ConstraintSpec.from_request(grammar_string=grammar))  # type: ignore[arg-type]
    for seed in range(4):
        text = random_walk(constraint.new_state(), vocab, seed=seed, budget=60, timer=timer)
        assert check(text), (grammar, text)


def test_json_object_walks_load(smollm, compiler, timer) -> None:
    adapter, vocab = smollm
    spec = ConstraintSpec.from_request(response_format={"type": "json_object"})
    assert spec is not None and spec.kind == "json_object"
    for seed in range(6):
        text = random_walk(compiler.compile(spec).new_state(), vocab, seed=seed, budget=80, timer=timer)
        assert isinstance(json.loads(text), dict)


def test_response_format_json_schema(smollm, compiler) -> None:
    adapter, vocab = smollm
    schema = SCHEMAS[3]
    spec = ConstraintSpec.from_request(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    assert spec == ConstraintSpec.from_request(json_schema=json.dumps(schema))
    text = random_walk(compiler.compile(spec).new_state(), vocab, seed=3)  # type: ignore[arg-type]
    jsonschema.validate(json.loads(text), schema)


def accepts(adapter: TokenizerAdapter, constraint: Any, text: str) -> bool:
    """The whole text, as the model's tokenizer spells it, is a complete match."""
    state = constraint.new_state()
    tokens = adapter.ll_tokenizer.tokenize_str(text)
    return state.advance_many(tokens) == len(tokens) and state.is_accepting()


OPEN_CITY = {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}  # pydantic's shape


def test_schema_without_additional_properties_allows_only_named_keys(smollm, compiler) -> None:
    adapter, vocab = smollm
    for fields in ({"json_schema": OPEN_CITY},
                   {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": OPEN_CITY}}}):
        constraint = compiler.compile(ConstraintSpec.from_request(**fields))
        assert accepts(adapter, constraint, '{"city": "Paris"}')
        assert not accepts(adapter, constraint, '{"city": "Paris", "properties": {"type": "x"}}')
        for seed in range(4):
            assert set(json.loads(random_walk(constraint.new_state(), vocab, seed=seed, budget=60))) == {"city"}
    explicit = compiler.compile(ConstraintSpec.from_request(json_schema=OPEN_CITY | {"additionalProperties": True}))
    assert accepts(adapter, explicit, '{"city": "Paris", "country": "France"}')
    any_object = compiler.compile(ConstraintSpec.from_request(response_format={"type": "json_object"}))
    assert accepts(adapter, any_object, '{"anything": {"at": ["all"]}}')


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_json_whitespace_is_bounded(smollm, compiler, kind: str) -> None:
    adapter, _ = smollm
    spec = ConstraintSpec.from_request(
        json_schema=OPEN_CITY if kind == "json_schema" else None,
        response_format={"type": "json_object"} if kind == "json_object" else None,
    )
    constraint = compiler.compile(spec)

    def with_space(ws: str) -> str:
        return '{"city":' + ws + '"Paris"}'

    for ok in ("", " ", "\n", "\n" + " " * 20, "\n\t\t"):
        assert accepts(adapter, constraint, with_space(ok)), repr(ok)
    for too_much in ("  ", "\n" + " " * 21, "\n\n", " \n", "\t"):
        assert not accepts(adapter, constraint, with_space(too_much)), repr(too_much)
    assert not accepts(adapter, constraint, " " + with_space(""))  # nothing before the object


def test_from_request_none_and_text() -> None:
    assert ConstraintSpec.from_request() is None
    assert ConstraintSpec.from_request(response_format={"type": "text"}) is None


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"json_schema": {"type": "foo"}}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": [1, 2]}, "json_schema"),
        ({"regex_pattern": "a(b"}, "regex_pattern"),
        ({"regex_pattern": r"(?<=a)b"}, "regex_pattern"),
        ({"grammar_string": "start: missing_rule"}, "grammar_string"),
        ({"grammar_string": 'root ::= item\n'}, "grammar_string"),
        ({"grammar_string": 'root ::= "a" (\n'}, "grammar_string"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
         "response_format.json_schema.schema"),
        ({"json_schema": {"type": "object"}, "regex_pattern": "a"}, "regex_pattern"),
    ],
)
def test_invalid_constraints_are_bad_requests(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        ConstraintSpec.from_request(**kwargs)
    assert info.value.param == param
    assert info.value.status == 400
    assert param.split(".")[0] in info.value.message


def test_compile_rejects_invalid_spec(compiler) -> None:
    with pytest.raises(BadRequestError, match="regex_pattern"):
        compiler.compile(ConstraintSpec("regex", "a(b", "regex_pattern"))


def test_advance_rejects_disallowed_token_and_rolls_back(smollm, compiler) -> None:
    adapter, vocab = smollm
    tok = adapter.ll_tokenizer
    state = compiler.compile(ConstraintSpec("regex", "abc|abd")).new_state()
    a, b = tok.tokenize_str("a"), tok.tokenize_str("b")
    z = tok.tokenize_str("z")
    with pytest.raises(ConstraintViolation):
        state.advance(z[0])
    state.advance(a[0])  # still usable after a refused token
    state.advance(b[0])
    assert not state.is_finished()
    assert {tok.decode_str([int(t)]) for t in state.allowed_tokens()} == {"c", "d"}
    state.rollback(2)
    assert state.n_advanced == 0
    assert state.is_allowed(a[0]) and not state.is_allowed(b[0])
    for t in tok.tokenize_str("abd"):
        state.advance(t)
    assert state.is_finished() and state.is_accepting()
    assert set(int(t) for t in state.allowed_tokens()) == set(adapter.eos_tokens)
    with pytest.raises(ValueError):
        state.rollback(10)


def test_special_tokens_never_allowed_in_text(smollm, compiler) -> None:
    adapter, vocab = smollm
    state = compiler.compile(ConstraintSpec("regex", r"(.|\n){0,50}")).new_state()
    allowed = set(int(t) for t in state.allowed_tokens())
    control = {i for i, p in enumerate(vocab.pieces) if p.startswith(b"<") and p.endswith(b">") and i < 17}
    assert control & allowed <= set(adapter.eos_tokens)  # EOS only, as the pattern accepts ""
    assert 1 not in allowed  # <|im_start|>


def test_apply_to_logits_and_parallel_fill(smollm, compiler) -> None:
    adapter, _ = smollm
    states = [compiler.compile(ConstraintSpec("regex", rx)).new_state() for rx in ("[0-9]+", "yes|no", "[a-z]+")]
    out = compiler.allocate_bitmask(len(states))
    expected = [s.allowed_mask().copy() for s in states]
    fresh = [compiler.compile(ConstraintSpec("regex", rx)).new_state() for rx in ("[0-9]+", "yes|no", "[a-z]+")]
    compiler.fill_bitmasks(fresh, out)
    for state, mask in zip(fresh, expected):
        assert np.array_equal(state.allowed_mask(), mask)
    logits = np.zeros(adapter.n_vocab, dtype=np.float32)
    states[1].apply_to_logits(logits)
    finite = np.flatnonzero(np.isfinite(logits))
    assert np.array_equal(finite, states[1].allowed_tokens())
    assert {adapter.ll_tokenizer.decode_str([int(t)]) for t in finite} <= {"y", "ye", "yes", "n", "no"}


def test_compiled_constraints_are_cached(smollm) -> None:
    compiler = ConstraintCompiler(smollm[0], cache_size=2)
    a = compiler.compile(ConstraintSpec("regex", "a+"))
    assert compiler.compile(ConstraintSpec("regex", "a+", "other")) is a
    compiler.compile(ConstraintSpec("regex", "b+"))
    compiler.compile(ConstraintSpec("regex", "c+"))
    assert compiler.cache_len() == 2
    assert compiler.compile(ConstraintSpec("regex", "a+")) is not a


def test_zz_report_mask_cost(timer, capsys) -> None:
    # Defined last, so it runs after the walks: a report, not an assertion.
    with capsys.disabled():
        print(
            f"\n[constraints] over {timer.steps} walk steps: mask {timer.ms(timer.mask_seconds):.3f} ms/step, "
            f"apply to logits {timer.ms(timer.apply_seconds):.3f} ms/step"
        )
