"""Constrained decoding: JSON schema / JSON object / regex / grammar, for every backend.

One layer on top of `llguidance` turns whatever a request asks for into a
per-sequence token mask. The flow, and who calls what:

1. The API mapping builds a `ConstraintSpec` from the request fields with
   `ConstraintSpec.from_request(json_schema=..., regex_pattern=...,
   grammar_string=..., response_format=...)`. It is a frozen, hashable value
   (it goes into `GenerationRequest`); invalid input is a `BadRequestError`
   naming the offending field, raised here, before anything is queued.
2. Once per loaded model, the backend builds a `TokenizerAdapter` from its
   vocabulary (`TokenizerAdapter.from_pieces(pieces, eos_token, special)`,
   ~0.3 s for a 49k vocabulary) and a `ConstraintCompiler` around it.
3. Per request, `compiler.compile(spec)` returns a `Constraint` (compiled
   grammar, kept in an LRU of 64 so repeated schemas cost nothing) and
   `constraint.new_state()` a `ConstraintState` for one sequence. Compiling a
   new, large schema can take milliseconds to (rarely) a second and drops the
   GIL: do it at admission in the scheduler thread or via `asyncio.to_thread`.
4. Each decode step, for each constrained sequence: `state.apply_to_logits(
   logits)` (disallowed logits become -inf, in place) before sampling, then
   `state.advance(token)` with the sampled token. `state.is_finished()` means
   the grammar is complete and only an end-of-generation token may follow:
   finish the sequence there (FinishReason.STOP) instead of sampling, which
   also keeps `ban_eos_token` / `min_tokens` from masking every token.
   `state.error` is set when llguidance hit a resource limit: finish with an
   error.

End of generation: every id passed as `eos_token` to the adapter is allowed
exactly when the grammar accepts (and only those once it cannot continue).
Pass the model's end-of-generation ids (e.g. `NativeModel.eog_tokens`). An
end-of-generation token sampled while `state.is_accepting()` simply ends the
sequence; advancing the state with it is optional. Special (control) tokens
are never allowed inside constrained text; Lark grammars can still name one
explicitly as `<|im_end|>`.

Masks: `state.bitmask()` is llguidance's int32 bitmask (token i allowed when
bit i % 32 of word i // 32 is set), cached until the next advance/rollback;
`allowed_mask()` is the same as a bool array. llama.cpp logits can be wrapped
in place with `np.ctypeslib.as_array(llama_get_logits_ith(ctx, i),
shape=(n_vocab,))` and passed to `apply_to_logits`. For several sequences at
once, `compiler.fill_bitmasks(states, out)` computes all masks in parallel
(llguidance's own thread pool) into one `(batch, words)` array.

Rollback: `state.rollback(n)` undoes the last n advanced tokens (for
banned-string rewinds or rejected speculative drafts). `state.forced_tokens()`
lists tokens the grammar alone decides from here (free draft tokens).

Regexes are matched whole (like `re.fullmatch`), in Rust `regex` syntax (no
lookarounds or backreferences); `\\d` means [0-9] (llguidance's own `\\d`
takes any Unicode digit). JSON schemas allow llama.cpp's bounded whitespace
between tokens (one space, or a newline and up to 20 spaces/tabs), so a model
cannot loop on whitespace, and are closed first (`common/formats/schema_closing.py`):
an object schema naming properties allows no others unless it says so with
`additionalProperties` or `patternProperties`, as in OpenAI's strict mode.
`grammar_string` is GBNF (llama.cpp) when it contains `::=` and is not
already Lark, otherwise llguidance's Lark dialect.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

from common.errors import BadRequestError, EngineError
from common.formats.schema_closing import close_object_schemas

ConstraintKind = Literal["json_schema", "json_object", "regex", "grammar"]

CACHE_SIZE = 64
# llama.cpp's json-schema-to-grammar whitespace: bounded, so no whitespace loops.
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
ANY_JSON_OBJECT = '{"type":"object"}'
_MAX_ERROR_CHARS = 600


class ConstraintViolation(EngineError):
    """A token the constraint does not allow was fed to `ConstraintState.advance`."""

    code = "constraint_violation"


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asks the output to match.

    `kind` is one of json_schema (source: JSON text of the schema),
    json_object (any JSON object; source is ignored), regex (the pattern,
    matched whole) or grammar (GBNF or Lark text). `param` only names the
    request field for error messages; it takes no part in equality/hashing.
    """

    kind: ConstraintKind
    source: str
    param: str | None = field(default=None, compare=False)

    @staticmethod
    def from_request(
        *,
        json_schema: Mapping[str, Any] | str | bool | None = None,
        regex_pattern: str | None = None,
        grammar_string: str | None = None,
        response_format: Mapping[str, Any] | Any | None = None,
    ) -> ConstraintSpec | None:
        """The spec for a request's constraint fields, validated; None when unconstrained.

        `response_format` takes OpenAI's shapes: {"type": "text"} (None),
        {"type": "json_object"}, {"type": "json_schema", "json_schema":
        {"name", "schema", "strict"}}. Asking for more than one constraint, or
        an invalid schema/regex/grammar, raises BadRequestError.
        """
        specs: list[ConstraintSpec] = []
        if response_format is not None:
            spec = _from_response_format(response_format)
            if spec is not None:
                specs.append(spec)
        if json_schema is not None:
            specs.append(_json_schema_spec(json_schema, "json_schema"))
        if regex_pattern is not None:
            if not isinstance(regex_pattern, str) or not regex_pattern:
                raise BadRequestError("'regex_pattern' must be a non-empty string.", param="regex_pattern")
            specs.append(ConstraintSpec("regex", regex_pattern, "regex_pattern"))
        if grammar_string is not None:
            if not isinstance(grammar_string, str) or not grammar_string.strip():
                raise BadRequestError("'grammar_string' must be a non-empty string.", param="grammar_string")
            specs.append(ConstraintSpec("grammar", grammar_string, "grammar_string"))
        if not specs:
            return None
        if len(specs) > 1:
            names = ", ".join(f"'{s.param}'" for s in specs)
            raise BadRequestError(
                f"Only one output constraint may be given per request, got {names}. "
                "Send just one of response_format, json_schema, regex_pattern or grammar_string.",
                param=specs[1].param,
            )
        spec = specs[0]
        spec.validate()
        return spec

    def grammar(self) -> str:
        """This spec as an llguidance grammar definition (raises BadRequestError)."""
        return _to_grammar(self)

    def validate(self) -> None:
        """Check the spec compiles, without a tokenizer (raises BadRequestError)."""
        grammar = self.grammar()
        error = llg.LLMatcher.validate_grammar(grammar, None, limits=_limits())
        if error:
            raise _invalid(self, error)


def gbnf_field(grammar: str | None, param: str = "grammar") -> ConstraintSpec | None:
    """A GBNF `grammar` field as KoboldCpp and llama-server take it: "" or None means none; errors name `param`."""
    if grammar is None or not grammar.strip():
        return None
    try:
        return ConstraintSpec.from_request(grammar_string=grammar)
    except BadRequestError as exc:
        message = exc.message.replace("'grammar_string'", f"'{param}'").rstrip(". ")
        raise BadRequestError(
            f"{message}. Fix the GBNF grammar (for example: root ::= \"yes\" | \"no\") or send \"\" for none.",
            param=param,
        ) from None


def _from_response_format(response_format: Any) -> ConstraintSpec | None:
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(response_format, Mapping):
        raise BadRequestError("'response_format' must be an object with a 'type'.", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", ANY_JSON_OBJECT, "response_format")
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if wrapper is None:
            raise BadRequestError(
                "response_format of type 'json_schema' needs a 'json_schema' object "
                "with 'name' and 'schema'.",
                param="response_format.json_schema",
            )
        if not isinstance(wrapper, Mapping):
            raise BadRequestError(
                "'response_format.json_schema' must be an object with 'name' and 'schema'.",
                param="response_format.json_schema",
            )
        schema = wrapper.get("schema")
        if schema is None:  # a name without a schema: any JSON object
            return ConstraintSpec("json_object", ANY_JSON_OBJECT, "response_format")
        return _json_schema_spec(schema, "response_format.json_schema.schema")
    raise BadRequestError(
        f"Unsupported response_format type {kind!r}; use 'text', 'json_object' or 'json_schema'.",
        param="response_format.type",
    )


def _json_schema_spec(schema: Mapping[str, Any] | str | bool, param: str) -> ConstraintSpec:
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise BadRequestError(f"'{param}' is not valid JSON: {exc}.", param=param) from None
        except RecursionError:
            raise _too_deep(param) from None
    else:
        parsed = schema
    if isinstance(parsed, bool):
        parsed = {} if parsed else {"not": {}}
    if not isinstance(parsed, Mapping):
        raise BadRequestError(
            f"'{param}' must be a JSON schema: an object such as {{\"type\": \"object\", ...}}, or true/false.",
            param=param,
        )
    try:
        closed = close_object_schemas(parsed)
    except RecursionError:
        raise _too_deep(param) from None
    # Key order is kept: llguidance emits properties in schema order.
    source = json.dumps(closed, ensure_ascii=False, separators=(",", ":"))
    return ConstraintSpec("json_schema", source, param)


def _too_deep(param: str) -> BadRequestError:
    return BadRequestError(f"'{param}' nests too deeply; flatten the schema (use $defs and $ref).", param=param)


def _json_options() -> dict[str, Any]:
    return {"whitespace_pattern": JSON_WHITESPACE}


def _limits() -> llg.LLParserLimits:
    return llg.LLParserLimits(verbose_errors=False)


def _to_grammar(spec: ConstraintSpec) -> str:
    if spec.kind in ("json_schema", "json_object"):
        source = spec.source if spec.kind == "json_schema" else ANY_JSON_OBJECT
        try:
            options: Any = _json_options()
            return llg.LLMatcher.grammar_from_json_schema(source, overrides=options)
        except ValueError as exc:
            raise _invalid(spec, str(exc)) from None
    if spec.kind == "regex":
        # regex_to_lark escapes '/' for Lark and makes \d / \D ASCII, as clients mean them.
        lark_regex = llg.regex_to_lark(spec.source, "d")
        return llg.LLMatcher.grammar_from_lark(f"start: /{lark_regex}/")
    if spec.kind == "grammar":
        return llg.LLMatcher.grammar_from_lark(grammar_to_lark(spec.source, spec.param))
    raise BadRequestError(f"Unknown constraint kind {spec.kind!r}.")


def grammar_to_lark(text: str, param: str | None = "grammar_string") -> str:
    """GBNF (contains '::=' and is not Lark) converted to llguidance Lark; Lark unchanged."""
    if "::=" in text and not is_lark_syntax(text):
        try:
            return gbnf_to_lark(text)
        except Exception as exc:  # the converter raises bare Exceptions too
            raise BadRequestError(
                f"Invalid GBNF grammar in '{param or 'grammar_string'}': {_trim(str(exc))}",
                param=param,
            ) from None
    return text


def _trim(message: str) -> str:
    message = message.split("\n<state>")[0].replace("\n<non-verbose/>", "").strip()
    if len(message) > _MAX_ERROR_CHARS:
        message = message[:_MAX_ERROR_CHARS] + "..."
    return message


def _invalid(spec: ConstraintSpec, error: str) -> BadRequestError:
    what = {
        "json_schema": "JSON schema",
        "json_object": "JSON object constraint",
        "regex": "regular expression",
        "grammar": "grammar",
    }[spec.kind]
    param = spec.param or spec.kind
    return BadRequestError(f"Invalid {what} in '{param}': {_trim(error)}", param=param)


def _greedy_tokenizer(pieces: Sequence[bytes], skip: set[int]) -> Callable[[bytes], list[int]]:
    """Longest-match tokenization over the pieces; only a fallback for llguidance's needs."""
    index: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        if piece and i not in skip:
            index.setdefault(piece, i)
    longest = max((len(p) for p in index), default=1)

    def tokenize(data: bytes) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(data):
            for size in range(min(longest, len(data) - i), 0, -1):
                token = index.get(data[i : i + size])
                if token is not None:
                    out.append(token)
                    i += size
                    break
            else:
                i += 1  # a byte no token spells: skip it rather than fail
        return out

    return tokenize


@dataclass
class _VocabSource:
    """The duck-typed tokenizer `llguidance.TokenizerWrapper` reads."""

    tokens: list[bytes]
    eos_token_id: int
    bos_token_id: int | None
    special_token_ids: list[int]
    encode: Callable[[bytes], list[int]]

    def __call__(self, data: bytes) -> list[int]:
        return self.encode(data)


class TokenizerAdapter:
    """A model's vocabulary as llguidance needs it; build once per loaded model."""

    def __init__(self, ll_tokenizer: llg.LLTokenizer, n_vocab: int, eos_tokens: tuple[int, ...]) -> None:
        self.ll_tokenizer = ll_tokenizer
        self.n_vocab = n_vocab
        self.eos_tokens = eos_tokens

    @classmethod
    def from_pieces(
        cls,
        pieces: Sequence[bytes],
        eos_token: int | Sequence[int],
        special: Iterable[int] | Mapping[int, Any] = (),
        *,
        bos_token: int | None = None,
        n_vocab: int | None = None,
        tokenize: Callable[[bytes], list[int]] | None = None,
    ) -> TokenizerAdapter:
        """Adapter from raw token bytes.

        pieces[i] is the raw bytes of token i (special tokens rendered, e.g.
        `NativeModel.piece(i, special=True)`). `eos_token` is one id or all
        end-of-generation ids. `special` lists the control tokens (a set of
        ids, or a dict keyed by id); they, the EOS and BOS ids never match
        grammar text. `n_vocab` pads to the logits width when it exceeds
        len(pieces). `tokenize` (bytes -> ids, no BOS) is the model's own
        tokenizer; without it a greedy longest-match stands in.
        """
        eos_list = [eos_token] if isinstance(eos_token, int) else list(eos_token)
        if not eos_list:
            raise ValueError("TokenizerAdapter needs at least one end-of-generation token id.")
        width = max(n_vocab or 0, len(pieces))
        tokens = list(pieces) + [b""] * (width - len(pieces))
        special_ids = set(special.keys() if isinstance(special, Mapping) else special)
        special_ids.update(eos_list)
        if bos_token is not None and bos_token >= 0:
            special_ids.add(bos_token)
        special_ids = {t for t in special_ids if 0 <= t < width}
        encode = tokenize or _greedy_tokenizer(tokens, special_ids)
        source = _VocabSource(tokens, eos_list[0], bos_token, sorted(special_ids), encode)
        ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(source), n_vocab=width, eos_token=eos_list)
        return cls(ll_tokenizer, width, tuple(eos_list))

    @property
    def mask_words(self) -> int:
        """int32 words in one token bitmask row."""
        return (self.n_vocab + 31) // 32


class Constraint:
    """A compiled constraint; immutable and shared by every request that uses it."""

    def __init__(self, spec: ConstraintSpec, tokenizer: TokenizerAdapter, matcher: llg.LLMatcher) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self._template = matcher  # never advanced; states start from copies

    def new_state(self) -> ConstraintState:
        """A fresh per-sequence state (a cheap copy, ~10 us)."""
        return ConstraintState(self._template.deep_copy(), self.tokenizer)


class ConstraintState:
    """The constraint's progress along one sequence. Not thread-safe; one owner."""

    def __init__(self, matcher: llg.LLMatcher, tokenizer: TokenizerAdapter) -> None:
        self.matcher = matcher
        self.n_vocab = tokenizer.n_vocab
        self.n_advanced = 0
        self._words = np.zeros(tokenizer.mask_words, dtype=np.int32)
        self._fresh = False  # _words holds the mask of the current position
        self._disallowed: np.ndarray | None = None

    # -- masks ----------------------------------------------------------------
    def bitmask(self) -> np.ndarray:
        """The next-token mask as int32 words, bit i of the vector = token i allowed.

        Cached until the next advance/rollback; the returned array is reused.
        """
        if not self._fresh:
            self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            self._fresh = True
            self._disallowed = None
        return self._words

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the mask into `out`, a C-contiguous int32 row of `mask_words` words."""
        if out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"] or out.size < self._words.size:
            raise ValueError("fill_bitmask needs a C-contiguous int32 row of mask_words words.")
        out[: self._words.size] = self.bitmask()

    def _load_bitmask(self, words: np.ndarray) -> None:
        """Adopt a mask computed elsewhere for the current position (parallel fill)."""
        self._words[:] = words[: self._words.size]
        self._fresh = True
        self._disallowed = None

    def allowed_mask(self) -> np.ndarray:
        """Boolean array of n_vocab: True where the token may come next."""
        return ~self._disallowed_mask()

    def _disallowed_mask(self) -> np.ndarray:
        words = self.bitmask()
        if self._disallowed is None:
            bits = np.unpackbits((~words).view(np.uint8), bitorder="little", count=self.n_vocab)
            self._disallowed = bits.view(np.bool_)
        return self._disallowed

    def allowed_tokens(self) -> np.ndarray:
        """Ids of the tokens that may come next."""
        return np.flatnonzero(self.allowed_mask())

    def is_allowed(self, token: int) -> bool:
        if not 0 <= token < self.n_vocab:
            return False
        words = self.bitmask()
        return bool((int(words[token >> 5]) >> (token & 31)) & 1)

    def apply_to_logits(self, logits: np.ndarray) -> None:
        """Set the logits of disallowed tokens to -inf, in place (1-D, float)."""
        disallowed = self._disallowed_mask()
        n = min(self.n_vocab, logits.shape[-1])
        np.copyto(logits[..., :n], -np.inf, where=disallowed[:n])
        if logits.shape[-1] > n:
            logits[..., n:] = -np.inf

    # -- progress -------------------------------------------------------------
    def advance(self, token: int) -> None:
        """Consume a sampled token; ConstraintViolation (state unchanged) when not allowed."""
        if not self.is_allowed(token):
            raise ConstraintViolation(
                f"Token {token} is not allowed by the output constraint at this point."
            )
        if not self.matcher.consume_token(token):
            raise ConstraintViolation(f"The output constraint failed: {_trim(self.matcher.get_error())}")
        self.n_advanced += 1
        self._fresh = False

    def advance_many(self, tokens: Sequence[int]) -> int:
        """Consume as many of `tokens` as the constraint allows; returns how many."""
        n = self.matcher.try_consume_tokens(list(tokens))
        if n:
            self.n_advanced += n
            self._fresh = False
        return n

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar alone decides from here (may be empty)."""
        return list(self.matcher.compute_ff_tokens())

    def is_finished(self) -> bool:
        """The constraint is complete: only an end-of-generation token may follow."""
        return bool(self.matcher.is_stopped())

    def is_accepting(self) -> bool:
        """Stopping here would satisfy the constraint (it may also continue)."""
        return bool(self.matcher.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a resource limit), or None."""
        return _trim(self.matcher.get_error()) if self.matcher.is_error() else None

    def rollback(self, n: int) -> None:
        """Undo the last `n` advanced tokens."""
        if n <= 0:
            return
        if n > self.n_advanced:
            raise ValueError(f"Cannot roll back {n} tokens; only {self.n_advanced} were advanced.")
        if not self.matcher.rollback(n):
            raise ConstraintViolation(f"The output constraint could not roll back: {self.error}")
        self.n_advanced -= n
        self._fresh = False


class ConstraintCompiler:
    """Compiles specs for one model's vocabulary, with an LRU of compiled constraints.

    Thread-safe: compile() may be called from the event loop and the
    scheduler thread alike.
    """

    def __init__(self, tokenizer: TokenizerAdapter, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Constraint] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: llg.LLExecutor | None = None

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """The compiled constraint for `spec` (cached); BadRequestError when invalid."""
        key = (spec.kind, spec.source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = spec.grammar()
        matcher = llg.LLMatcher(self.tokenizer.ll_tokenizer, grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise _invalid(spec, matcher.get_error())
        constraint = Constraint(spec, self.tokenizer, matcher)
        with self._lock:
            self._cache[key] = constraint
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return constraint

    def new_state(self, spec: ConstraintSpec) -> ConstraintState:
        return self.compile(spec).new_state()

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def allocate_bitmask(self, batch: int) -> np.ndarray:
        """A (batch, mask_words) int32 array for `fill_bitmasks`."""
        return np.full((batch, self.tokenizer.mask_words), -1, dtype=np.int32)

    def fill_bitmasks(self, states: Sequence[ConstraintState], out: np.ndarray) -> None:
        """Compute the masks of many states in parallel (llguidance threads) into out[i].

        Each state keeps its row too, so `apply_to_logits` afterwards costs no
        second mask computation.
        """
        if out.dtype != np.int32 or out.ndim != 2 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError("fill_bitmasks needs a C-contiguous 2-D int32 array.")
        if out.shape[0] < len(states) or out.shape[1] != self.tokenizer.mask_words:
            raise ValueError("fill_bitmasks: out must have one row of mask_words words per state.")
        if not states:
            return
        if self._executor is None:
            self._executor = llg.LLExecutor()
        pairs = [(state.matcher, i) for i, state in enumerate(states)]
        self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, out.shape[1] * 4, out.shape[0])
        for i, state in enumerate(states):
            state._load_bitmask(out[i])
